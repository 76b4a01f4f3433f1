"""Typed, frozen, validated options of the palettization pass, and their one parser.

A `PalettizeSpec` says how to palettize one weight; a `PalettizeConfig` which weights, with the
same selection fields as pruning (`op_types`, `op_names`, `overrides`, `min_size`). The short
form is `lutN[@gG][:uniform]`: `lut4` (4-bit, one k-means table per tensor), `lut4@g16` (one
table per group of 16 output channels), `lut6:uniform` (evenly spaced entries).
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from milsparse.ir.errors import ConfigError
from milsparse.passes.config import (
    SelectionMethods,
    config_parser,
    spec_reader,
)

__all__ = ["PalettizeSpec", "PalettizeConfig", "parse_palettize_spec", "parse_palettize_config"]

NBITS = (1, 2, 3, 4, 6, 8)
IOS16_NBITS = (1, 2, 4, 6, 8)
MODES = ("kmeans", "uniform")
GRANULARITIES = ("per_tensor", "per_grouped_channel")


def _positive_int(instance, attribute, value):
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{attribute.name} must be an integer >= 1, got {value!r}")


@attrs.frozen
class PalettizeSpec:
    """How to palettize one weight.

    nbits: bits per index, one of 1, 2, 3, 4, 6, 8 (iOS16/17: not 3).
    mode: "kmeans" (the table minimising the squared error, exact up to 6 bits) or "uniform"
        (2^nbits evenly spaced entries from the smallest to the largest value).
    granularity: "per_tensor" (one table) or "per_grouped_channel" (one table per
        `group_size` consecutive output channels; iOS18).
    """

    nbits: int = attrs.field(validator=attrs.validators.in_(NBITS))
    mode: str = attrs.field(default="kmeans", validator=attrs.validators.in_(MODES))
    granularity: str = attrs.field(
        default="per_tensor", validator=attrs.validators.in_(GRANULARITIES)
    )
    group_size: int = attrs.field(default=32, validator=_positive_int)

    def __attrs_post_init__(self):
        if isinstance(self.nbits, bool):
            raise ConfigError("nbits must be an integer, not a bool")

    def to_string(self) -> str:
        groups = f"@g{self.group_size}" if self.granularity == "per_grouped_channel" else ""
        mode = ":uniform" if self.mode == "uniform" else ""
        return f"lut{self.nbits}{groups}{mode}"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


_SPEC_RE = re.compile(r"^lut(?P<nbits>\d+)(?:@g(?P<group>\d+))?(?::(?P<mode>\w+))?$")


def parse_palettize_spec(text: str) -> PalettizeSpec:
    """Parse `lutN[@gG][:kmeans|:uniform]`, e.g. `lut4`, `lut4@g16`, `lut6:uniform`."""
    if not isinstance(text, str):
        raise ConfigError(f"a palettize spec must be a string, got {type(text).__name__}")
    match = _SPEC_RE.match(text.strip())
    if match is None:
        raise ConfigError(
            f"bad palettize spec {text!r}: use lutN[@gG][:uniform] (e.g. lut4, lut4@g16)"
        )
    group = match["group"]
    try:
        return PalettizeSpec(
            nbits=int(match["nbits"]),
            mode=match["mode"] or "kmeans",
            granularity="per_grouped_channel" if group else "per_tensor",
            group_size=int(group) if group else 32,
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
