"""Typed, frozen, validated options of the palettization pass, and their one parser.

A `PalettizeSpec` says how to palettize one weight; a `PalettizeConfig` which weights, with the
same selection fields as pruning (`op_types`, `op_names`, `overrides`, `min_size`). The short
form is `lut[N][xV][@gG][:uniform|:unique]`: `lut4` (4-bit, one k-means table per tensor),
`lut4@g16` (one table per group of 16 output channels), `lut6:uniform` (evenly spaced entries),
`lut4x2` (vector palettization: each entry is a vector of 2 consecutive output channels'
values), `lut:unique` (lossless: the table holds the weight's distinct values, with the fewest
bits that hold them all). Mode `custom` (a Python `lut_function` gives each table and its
indices) has no text form.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from milsparse.ir.errors import ConfigError
from milsparse.passes.config import (
    SelectionMethods,
    config_parser,
    positive_int,
    spec_reader,
)

__all__ = ["PalettizeSpec", "PalettizeConfig", "parse_palettize_spec", "parse_palettize_config"]

NBITS = (1, 2, 3, 4, 6, 8)
IOS16_NBITS = (1, 2, 4, 6, 8)
MODES = ("kmeans", "uniform", "unique", "custom")
_CHOSEN_BITS = ("unique", "custom")  # modes whose bits may come from the weight
GRANULARITIES = ("per_tensor", "per_grouped_channel")


@attrs.frozen
class PalettizeSpec:
    """How to palettize one weight.

    nbits: bits per index, one of 1, 2, 3, 4, 6, 8 (iOS16/17: not 3); None for modes unique
        and custom: the fewest bits that hold the table, chosen per weight.
    mode: "kmeans" (the table minimising the squared error, exact up to 6 bits), "uniform"
        (2^nbits evenly spaced entries from the smallest to the largest value), "unique" (the
        distinct values: lossless; a weight with more than 2^nbits of them in a table stays
        dense) or "custom" (`lut_function(values) -> (lut, indices)` per table, as
        coremltools calls it: the group's values with the output channels first).
    granularity: "per_tensor" (one table) or "per_grouped_channel" (one table per
        `group_size` consecutive output channels; iOS18).
    cluster_dim: elements per table entry, taken along the output channels (vector
        palettization, iOS18, k-means only); the output channels, and `group_size`, must be
        multiples of it.
    channel_axis: the weight's axis that groups and vectors run along instead of its output
        channels (None), as coremltools' `channel_axis`; negative counts from the end.
    per_channel_scale: coremltools' `enable_per_channel_scale` (iOS18): the weight is divided
        by its largest magnitude along the channel axis before palettizing, and those scales
        are stored in a `constexpr_blockwise_shift_scale` that reads the table's output.
    """

    nbits: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.in_(NBITS))
    )
    mode: str = attrs.field(default="kmeans", validator=attrs.validators.in_(MODES))
    granularity: str = attrs.field(
        default="per_tensor", validator=attrs.validators.in_(GRANULARITIES)
    )
    group_size: int = attrs.field(default=32, validator=positive_int)
    cluster_dim: int = attrs.field(default=1, validator=positive_int)
    lut_function: Any = attrs.field(default=None, eq=False, repr=False)
    channel_axis: int | None = attrs.field(default=None)
    per_channel_scale: bool = attrs.field(
        default=False, validator=attrs.validators.instance_of(bool)
    )

    def __attrs_post_init__(self):
        if isinstance(self.nbits, bool):
            raise ConfigError("nbits must be an integer, not a bool")
        if self.nbits is None and self.mode not in _CHOSEN_BITS:
            raise ConfigError(f"mode {self.mode} needs nbits (1, 2, 3, 4, 6 or 8)")
        if (self.mode == "custom") != (self.lut_function is not None):
            raise ConfigError(
                "mode custom needs a lut_function (values -> (lut, indices))"
                if self.mode == "custom"
                else f"lut_function is for mode custom, not {self.mode}"
            )
        if self.lut_function is not None and not callable(self.lut_function):
            raise ConfigError(f"lut_function must be callable, got {self.lut_function!r}")
        if self.channel_axis is not None and (
            isinstance(self.channel_axis, bool) or not isinstance(self.channel_axis, int)
        ):
            raise ConfigError(f"channel_axis must be an integer axis, got {self.channel_axis!r}")
        if self.mode == "custom" and self.cluster_dim > 1:
            raise ConfigError("mode custom palettizes scalars (cluster_dim 1)")
        if self.cluster_dim > 1 and self.mode not in ("kmeans", "unique", "custom"):
            raise ConfigError(
                f"cluster_dim {self.cluster_dim} (vector palettization) needs mode kmeans, "
                f"not {self.mode}"
            )
        if self.granularity == "per_grouped_channel" and self.group_size % self.cluster_dim:
            raise ConfigError(
                f"group_size {self.group_size} must be a multiple of cluster_dim {self.cluster_dim}"
            )

    @property
    def ios16_compatible(self) -> bool:
        """iOS16/17's constexpr_lut_to_dense holds it: one scalar table, no 3-bit indices."""
        return (
            self.nbits in (*IOS16_NBITS, None)
            and self.granularity == "per_tensor"
            and self.cluster_dim == 1
            and not self.per_channel_scale
        )

    def to_string(self) -> str:
        vector = f"x{self.cluster_dim}" if self.cluster_dim > 1 else ""
        groups = f"@g{self.group_size}" if self.granularity == "per_grouped_channel" else ""
        if self.channel_axis is not None and (groups or vector or self.per_channel_scale):
            groups += f"@axis{self.channel_axis}"
        if self.per_channel_scale:
            groups += "@pcs"
        mode = "" if self.mode == "kmeans" else f":{self.mode}"
        return f"lut{self.nbits or ''}{vector}{groups}{mode}"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, filter=lambda a, _: a.name != "lut_function")


_SPEC_RE = re.compile(
    r"^lut(?P<nbits>\d+)?(?:x(?P<vector>\d+))?(?:@g(?P<group>\d+))?(?:@axis(?P<axis>-?\d+))?(?P<pcs>@pcs)?"
    r"(?::(?P<mode>\w+))?$"
)


def parse_palettize_spec(text: str) -> PalettizeSpec:
    """Parse `lut[N][xV][@gG][:kmeans|:uniform|:unique]`, e.g. `lut4`, `lut4@g16`,
    `lut6:uniform`, `lut4x2`, `lut:unique`."""
    if not isinstance(text, str):
        raise ConfigError(f"a palettize spec must be a string, got {type(text).__name__}")
    match = _SPEC_RE.match(text.strip())
    if match is None:
        raise ConfigError(
            f"bad palettize spec {text!r}: use lutN[xV][@gG][:uniform] or lut[N]...:unique "
            "(e.g. lut4, lut4@g16, lut4x2, lut:unique)"
        )
    if match["mode"] == "custom":
        raise ConfigError(
            f"bad palettize spec {text!r}: mode custom takes a Python lut_function "
            "(PalettizeSpec(mode='custom', lut_function=...) or milsparse.coreml)"
        )
    group = match["group"]
    try:
        return PalettizeSpec(
            nbits=int(match["nbits"]) if match["nbits"] else None,
            mode=match["mode"] or "kmeans",
            granularity="per_grouped_channel" if group else "per_tensor",
            group_size=int(group) if group else 32,
            cluster_dim=int(match["vector"] or 1),
            channel_axis=int(match["axis"]) if match["axis"] else None,
            per_channel_scale=bool(match["pcs"]),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad palettize spec {text!r}: {e}") from e


_spec_from = spec_reader(PalettizeSpec, parse_palettize_spec)


@attrs.frozen
class PalettizeConfig(SelectionMethods):
    """Which weights the palettization pass touches, and how (fields as `PruneConfig`'s)."""

    spec: PalettizeSpec
    read_spec = staticmethod(_spec_from)

    def __attrs_post_init__(self):
        self._check_selection(PalettizeSpec)


parse_palettize_config = config_parser(PalettizeConfig, PalettizeSpec, "palettize", "nbits", "lut4")
