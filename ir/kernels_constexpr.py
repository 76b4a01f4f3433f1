"""Kernels of the iOS16 and iOS18 constexpr (compressed weight) ops.

Each calls the one decoder of its format in `milsparse.ir.formats`; the joint forms
(`constexpr_lut_to_sparse`, `constexpr_sparse_blockwise_shift_scale`) decode their nonzeros
with the dense decoder over the scattered indices and return (mask, nonzero values), which
`constexpr_sparse_to_dense` then scatters.
"""

from __future__ import annotations

import numpy as np
from milsparse.ir import formats
from milsparse.ir.interpreter import kernel
from milsparse.ir.kernels_math import _scalar


@kernel("constexpr_sparse_to_dense")
def sparse_to_dense(op, v, ctx):
    if v.get("shape") is not None:
        return formats.decode_sparse_ios16(v["nonzero_data"], v["mask"], v["shape"])
    return formats.decode_sparse_ios18(v["nonzero_data"], v["mask"])


@kernel("constexpr_lut_to_dense")
def lut_to_dense(op, v, ctx):
    if v.get("shape") is not None:
        return formats.decode_lut_ios16(v["lut"], v["indices"], v["shape"])
    return formats.decode_lut_ios18(v["indices"], v["lut"], _scalar(v.get("vector_axis")))


@kernel("constexpr_affine_dequantize")
def affine_dequantize(op, v, ctx):
    return formats.decode_affine_ios16(
        v["quantized_data"], v["zero_point"], v["scale"], int(_scalar(v["axis"]))
    )


@kernel("constexpr_blockwise_shift_scale")
def blockwise_shift_scale(op, v, ctx):
    return formats.decode_blockwise_ios18(v["data"], v["scale"], v.get("offset"))


@kernel("constexpr_cast")
def constexpr_cast(op, v, ctx):
    return np.asarray(v["source_val"], dtype=np.float32)


@kernel("constexpr_lut_to_sparse")
def lut_to_sparse(op, v, ctx):
    mask = np.asarray(v["indices_mask"])
    indices = formats.decode_sparse_ios18(np.asarray(v["indices_nonzero_data"]), mask)
    vector_axis = _scalar(v.get("vector_axis"))
    dense = formats.decode_lut_ios18(indices, v["lut"], vector_axis)
    lut = np.asarray(v["lut"])
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=int(vector_axis))
    return mask, np.compress(mask.ravel() != 0, dense.ravel())


@kernel("constexpr_sparse_blockwise_shift_scale")
def sparse_blockwise_shift_scale(op, v, ctx):
    mask = np.asarray(v["data_mask"])
    data = formats.decode_sparse_ios18(np.asarray(v["nonzero_data"]), mask)
    dense = formats.decode_blockwise_ios18(data, v["scale"], v.get("offset"))
    return mask, np.compress(mask.ravel() != 0, dense.ravel())
