"""Bring compressed weights along when a program's opset is raised to iOS18.

Three constexpr ops changed their operands in the iOS18 opset, so an iOS16-form op left in a
function that now targets iOS18 makes a package that nothing loads ("Unknown input 'shape'").
When `compress --target ios18` raises an older program, each is rewritten into its iOS18 form,
decoding to the same dense weight bit for bit:

    constexpr_sparse_to_dense(nonzero_data, mask=uint8[ceil(N/8)], shape)      (iOS16)
 -> constexpr_sparse_to_dense(nonzero_data, mask=uint1[shape])                 (iOS18)

    constexpr_lut_to_dense(lut=T[2^n], indices=uint8[packed], shape)           (iOS16)
 -> constexpr_lut_to_dense(indices=uint{n}[shape], lut=T[1, ..., 1, 2^n, 1])   (iOS18)

    constexpr_cast(source_val, output_dtype) with attribute operands           (iOS16)
 -> constexpr_cast(source_val, output_dtype) with input operands              (iOS18)

`constexpr_affine_dequantize` is unchanged in the iOS18 opset and stays as it is.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from milsparse.ir import formats
from milsparse.ir.bits import unpack_bits
from milsparse.ir.graph import walk_ops
from milsparse.passes._rewrite import replace_op

__all__ = ["upgrade_constexpr_ops", "UPGRADED_OPS"]

UPGRADED_OPS = ("constexpr_sparse_to_dense", "constexpr_lut_to_dense", "constexpr_cast")

_UINT_TYPES = {
    1: types.np_uint1_dtype,
    2: types.np_uint2_dtype,
    3: types.np_uint3_dtype,
    4: types.np_uint4_dtype,
    6: types.np_uint6_dtype,
    8: np.uint8,
}


def _is_ios16_form(op) -> bool:
    if op.op_type in ("constexpr_sparse_to_dense", "constexpr_lut_to_dense"):
        return "shape" in op.inputs
    if op.op_type == "constexpr_cast":
        return op.opset_version is not None and op.opset_version < AvailableTarget.iOS18
    return False


def upgrade_constexpr_ops(prog, spill=None) -> list[str]:
    """Rewrite the iOS16-form constexpr ops of every function that targets iOS18 or later into
    their iOS18 forms, the unpacked values into `spill` (an `ir.blobs.Spill`, or None to keep
    them in memory); return the names of the rewritten ops."""
    upgraded = []
    for func in prog.functions.values():
        if func.opset_version is None or func.opset_version < AvailableTarget.iOS18:
            continue
        for op in list(walk_ops(func)):
            if op.op_type in UPGRADED_OPS and _is_ios16_form(op):
                replace_op(op, _BUILDERS[op.op_type](op), spill)
                upgraded.append(op.name)
    return upgraded


def _sparse(op):
    name = op.name
    shape = tuple(int(d) for d in op.shape.val)
    bits = formats.unpack_mask(op.mask.val, shape)
    nonzero = op.nonzero_data.val

    def build(site, tmp_name):
        data = site.const(nonzero, f"{name}_nonzero_data")
        mask = site.const(bits.view(np.uint8).view(types.np_uint1_dtype), f"{name}_mask")
        return mb.constexpr_sparse_to_dense(
            nonzero_data=data, mask=mask, name=tmp_name, before_op=site.op
        )

    return build


def _lut(op):
    name = op.name
    shape = tuple(int(d) for d in op.shape.val)
    lut = np.asarray(op.lut.val)
    nbits = int(np.log2(lut.size))
    count = int(np.prod(shape, dtype=np.int64))
    indices = unpack_bits(op.indices.val, nbits, count).reshape(shape)
    table = lut.reshape((1,) * len(shape) + (lut.size, 1))

    def build(site, tmp_name):
        idx = site.const(indices.astype(_UINT_TYPES[nbits]), f"{name}_indices")
        lut_var = site.const(table, f"{name}_lut")
        return mb.constexpr_lut_to_dense(indices=idx, lut=lut_var, name=tmp_name, before_op=site.op)

    return build


def _cast(op):
    source = op.source_val.val
    dtype = op.output_dtype.val

    def build(site, tmp_name):
        return mb.constexpr_cast(
            source_val=site.const(source, f"{op.name}_source_val"),
            output_dtype=dtype,
            name=tmp_name,
            before_op=site.op,
        )

    return build


_BUILDERS = {
    "constexpr_sparse_to_dense": _sparse,
    "constexpr_lut_to_dense": _lut,
    "constexpr_cast": _cast,
}
