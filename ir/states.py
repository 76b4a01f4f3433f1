"""The weight states: how a weight is held in a program. Data only (no coremltools), so pass
declarations and `milsparse passes` can name them without importing coremltools."""

from __future__ import annotations

import enum

__all__ = ["Form", "WEIGHT_STATES"]


class Form(str, enum.Enum):
    """How a weight is held: dense, or compressed into one of the constexpr forms (sparse,
    palettized, quantized, or the joint iOS18 forms: sparse values palettized or quantized); a
    `CAST` is an fp16 const cast to fp32. The values are how reports and pass declarations name
    them."""

    DENSE = "dense"
    SPARSE = "sparse"
    PALETTIZED = "palettized"
    QUANTIZED = "quantized"
    SPARSE_PALETTIZED = "sparse+palettized"
    SPARSE_QUANTIZED = "sparse+quantized"
    CAST = "cast"

    @property
    def sparse(self) -> bool:
        return self in (Form.SPARSE, Form.SPARSE_PALETTIZED, Form.SPARSE_QUANTIZED)


# The states passes consume and produce (a cast is not one: passes see through it).
WEIGHT_STATES = tuple(f.value for f in Form if f is not Form.CAST)
