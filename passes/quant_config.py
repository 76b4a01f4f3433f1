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
    is_int,
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
    block_shape: per_block with the block given on each of the weight's own axes instead
        (coremltools' per-axis `block_size`): `(1, 32)` is per output channel and 32 input
        channels, `(0, 32)` shares each block's scale across every output channel; 0 is the
        whole axis. Every axis must be a multiple of its block, and the rank the weight's.
    """

    dtype: str = attrs.field(validator=attrs.validators.in_(tuple(DTYPES)))
    mode: str = attrs.field(default="linear_symmetric", validator=attrs.validators.in_(MODES))
    granularity: str = attrs.field(
        default="per_channel", validator=attrs.validators.in_(GRANULARITIES)
    )
    block_size: int = attrs.field(default=32, validator=positive_int)
    block_shape: tuple[int, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(tuple)
    )

    def __attrs_post_init__(self):
        if self.block_shape is None:
            return
        if self.granularity != "per_block":
            raise ConfigError(f"block_shape is for per_block, not {self.granularity}")
        if not self.block_shape or not all(is_int(b, 0) for b in self.block_shape):
            raise ConfigError(
                f"block_shape must be integers >= 0, one per axis, got {self.block_shape!r}"
            )

    @property
    def nbits(self) -> int:
        return DTYPES[self.dtype]

    @property
    def signed(self) -> bool:
        return not self.dtype.startswith("u")

    def to_string(self) -> str:
        block = self.block_size
        if self.block_shape is not None:
            block = "x".join(map(str, self.block_shape))
        where = {"per_tensor": "@t", "per_channel": "", "per_block": f"@b{block}"}
        mode = ":affine" if self.mode == "linear" else ""
        return f"{self.dtype}{where[self.granularity]}{mode}"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


_SPEC_RE = re.compile(
    r"^(?P<dtype>u?int[48])(?:@(?P<where>t|ch|b\d+(?:x\d+)*))?(?::(?P<mode>\w+))?$"
)


def parse_quantize_spec(text: str) -> QuantizeSpec:
    """Parse `DTYPE[@ch|@t|@bN|@bAxBx...][:affine|:symmetric]`, e.g. `int8`, `int4@b32`,
    `uint8:affine`, `int4@b0x32` (a block per axis of the weight, 0 the whole axis)."""
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
            block_size=int(where[1:]) if where.startswith("b") and "x" not in where else 32,
            block_shape=tuple(map(int, where[1:].split("x"))) if "x" in where else None,
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
