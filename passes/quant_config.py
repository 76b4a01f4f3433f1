"""Typed, frozen, validated options of the linear quantization pass, and their one parser.

Short form: `DTYPE[@ch|@t|@bN][:affine]`: `int8` (per output channel, symmetric), `int8@t` (one
scale per tensor), `int4@b32` (per output channel and block of 32 input channels),
`uint8:affine` (a zero point per group, the range not forced symmetric).
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

__all__ = ["QuantizeSpec", "QuantizeConfig", "parse_quantize_spec", "parse_quantize_config"]

DTYPES = {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4}
MODES = ("linear_symmetric", "linear")
GRANULARITIES = ("per_tensor", "per_channel", "per_block")


@attrs.frozen
class QuantizeSpec:
    """How to quantize one weight: w ~ (q - offset) * scale.

    dtype: "int8", "uint8", "int4", "uint4" (iOS16/17: int8 and uint8 only).
    mode: "linear_symmetric" (offset 0, or the middle of an unsigned range) or "linear"
        (affine: a zero point per group, the range from the group's minimum to its maximum,
        zero included).
    granularity: "per_tensor", "per_channel" (one scale per output channel; the default), or
        "per_block" (per output channel and block of `block_size` input channels; iOS18).
    """

    dtype: str = attrs.field(validator=attrs.validators.in_(tuple(DTYPES)))
    mode: str = attrs.field(default="linear_symmetric", validator=attrs.validators.in_(MODES))
    granularity: str = attrs.field(
        default="per_channel", validator=attrs.validators.in_(GRANULARITIES)
    )
    block_size: int = attrs.field(default=32, validator=positive_int)

    @property
    def nbits(self) -> int:
        return DTYPES[self.dtype]

    @property
    def signed(self) -> bool:
        return not self.dtype.startswith("u")

    def to_string(self) -> str:
        where = {"per_tensor": "@t", "per_channel": "", "per_block": f"@b{self.block_size}"}
        mode = ":affine" if self.mode == "linear" else ""
        return f"{self.dtype}{where[self.granularity]}{mode}"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


_SPEC_RE = re.compile(r"^(?P<dtype>u?int[48])(?:@(?P<where>t|ch|b\d+))?(?::(?P<mode>\w+))?$")


def parse_quantize_spec(text: str) -> QuantizeSpec:
    """Parse `DTYPE[@ch|@t|@bN][:affine|:symmetric]`, e.g. `int8`, `int4@b32`, `uint8:affine`."""
    if not isinstance(text, str):
        raise ConfigError(f"a quantize spec must be a string, got {type(text).__name__}")
    match = _SPEC_RE.match(text.strip())
    if match is None:
        raise ConfigError(
            f"bad quantize spec {text!r}: use DTYPE[@ch|@t|@bN][:affine] with DTYPE int8, "
            "uint8, int4 or uint4 (e.g. int8, int4@b32)"
        )
    where = match["where"] or "ch"
    modes = {None: "linear_symmetric", "symmetric": "linear_symmetric", "affine": "linear"}
    if match["mode"] not in modes:
        raise ConfigError(f"bad mode in {text!r}: use :affine or :symmetric")
    try:
        return QuantizeSpec(
            dtype=match["dtype"],
            mode=modes[match["mode"]],
            granularity={"t": "per_tensor", "ch": "per_channel"}.get(where, "per_block"),
            block_size=int(where[1:]) if where.startswith("b") else 32,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad quantize spec {text!r}: {e}") from e


_spec_from = spec_reader(QuantizeSpec, parse_quantize_spec)


@attrs.frozen
class QuantizeConfig(SelectionMethods):
    """Which weights the quantization pass touches, and how (fields as `PruneConfig`'s)."""

    spec: QuantizeSpec
    read_spec = staticmethod(_spec_from)

    def __attrs_post_init__(self):
        self._check_selection(QuantizeSpec)


parse_quantize_config = config_parser(QuantizeConfig, QuantizeSpec, "quantize", "dtype", "int8")
