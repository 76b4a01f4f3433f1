"""A read-only table of a program's weights: format, sparsity and bytes of each.

A weight is a `const` of 10 or more float elements read by a non-constexpr op, or the last op of
a chain of constexpr ops (e.g. `constexpr_lut_to_sparse -> constexpr_sparse_to_dense`). Its
stored bytes are the weight-file bytes of every const feeding the chain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from coremltools.converters.mil.mil import types
from milsparse.ir import formats
from milsparse.ir.graph import uses_of, walk_ops

__all__ = ["WeightRow", "weight_table", "FORMAT_NAMES"]

FORMAT_NAMES = {
    "constexpr_sparse_to_dense": "sparse",
    "constexpr_lut_to_dense": "lut",
    "constexpr_lut_to_sparse": "lut",
    "constexpr_affine_dequantize": "quant",
    "constexpr_blockwise_shift_scale": "quant",
    "constexpr_sparse_blockwise_shift_scale": "quant",
    "constexpr_cast": "cast",
}
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class WeightRow:
    name: str
    consumers: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    format: str
    sparsity: float
    dense_bytes: int
    stored_bytes: int
    function: str | None = None  # set for multifunction programs
    shared_with: str | None = None  # another function stores this weight (counted there)

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.stored_bytes / self.num_elements if self.num_elements else 0.0

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["consumers"] = list(self.consumers)
        row["shape"] = list(self.shape)
        row["bits_per_weight"] = self.bits_per_weight
        return row


def _const_bytes(var) -> int:
    val = var.val
    if isinstance(val, np.ndarray):
        bits = _bits_of(var)
        return formats.tensor_storage_bytes(val.size, bits)
    return 0


def _bits_of(var) -> int:
    return _BITS.get(types.builtin_to_string(var.dtype), var.val.dtype.itemsize * 8)


_BITS = {"uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "int4": 4, "uint6": 6}


def _chain_inputs(op, seen) -> list:
    """Every const var feeding the constexpr chain ending in `op`."""
    consts = []
    for value in op.inputs.values():
        values = value if isinstance(value, (list, tuple)) else (value,)
        for var in values:
            if var.op is None or id(var.op) in seen:
                continue
            seen.add(id(var.op))
            if var.op.op_type == "const":
                consts.append(var)
            elif var.op.op_type.startswith("constexpr_"):
                consts.extend(_chain_inputs(var.op, seen))
    return consts


def _chain_types(op) -> list[str]:
    kinds = []
    for value in op.inputs.values():
        values = value if isinstance(value, (list, tuple)) else (value,)
        for var in values:
            if var.op is not None and var.op.op_type.startswith("constexpr_"):
                kinds.extend(_chain_types(var.op))
    kinds.append(op.op_type)
    return kinds


def _sparsity_of_chain(op, out_var) -> float:
    """Fraction of zeros of the decoded weight, read from a sparse mask when there is one."""
    n = int(np.prod(out_var.shape, dtype=np.int64)) if out_var.shape else 1
    if op.op_type == "constexpr_sparse_to_dense":
        mask = op.mask.val
        if mask is not None:
            # iOS16 masks are packed bytes (padding bits are zero); iOS18 masks hold 0/1.
            packed = "shape" in op.inputs
            ones = int(np.unpackbits(mask).sum()) if packed else int(np.count_nonzero(mask))
            return 1.0 - ones / n
    return float("nan")


def weight_table(prog, functions=None) -> list[WeightRow]:
    """One row per weight of every function of `prog` (or of the named `functions`), in
    program order."""
    rows = []
    multifunction = len(prog.functions) > 1
    stored_by: dict[tuple, str] = {}  # the arrays a weight is stored in -> first function
    for name, func in prog.functions.items():
        if functions is not None and name not in functions:
            continue
        for op in walk_ops(func):
            row = _row_for(op)
            if row is None:
                continue
            if multifunction:
                # the loader gives functions that share a weight-file record the same array
                key = tuple(id(v.val) for v in _stored_vars(op))
                first = stored_by.setdefault(key, name)
                row = replace(row, function=name, shared_with=None if first == name else first)
            rows.append(row)
    return rows


def _stored_vars(op) -> list:
    return [op.outputs[0]] if op.op_type == "const" else _chain_inputs(op, set())


def _row_for(op) -> WeightRow | None:
    if op.op_type != "const" and not op.op_type.startswith("constexpr_"):
        return None
    out = op.outputs[-1] if op.op_type == "constexpr_sparse_to_dense" else op.outputs[0]
    uses = uses_of(out)
    if not uses or any(u.op_type.startswith("constexpr_") for u in uses):
        return None
    consumers = tuple(f"{u.op.name}.{u.input_name}" for u in uses)
    shape = tuple(int(d) for d in out.shape)
    dtype = out.dtype
    dtype_name = types.builtin_to_string(dtype)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if op.op_type == "const":
        val = out.val
        if (
            not isinstance(val, np.ndarray)
            or val.dtype not in _FLOATS
            or val.size <= formats.INLINE_MAX_ELEMENTS
        ):
            return None
        zeros = val.size - int(np.count_nonzero(val))
        size = formats.dense_bytes(val.size, val.dtype)
        return WeightRow(
            op.name, consumers, shape, dtype_name, "dense", zeros / val.size, size, size
        )
    itemsize = np.dtype(types.nptype_from_builtin(dtype)).itemsize
    stored = sum(_const_bytes(v) for v in _chain_inputs(op, set()))
    kinds = [FORMAT_NAMES.get(k, k) for k in _chain_types(op)]
    fmt = "+".join(dict.fromkeys(kinds))
    if op.op_type == "constexpr_sparse_to_dense" and "shape" in op.inputs:
        fmt += "(ios16)"
    return WeightRow(
        op.name,
        consumers,
        shape,
        dtype_name,
        fmt,
        _sparsity_of_chain(op, out),
        formats.tensor_storage_bytes(n, itemsize * 8),
        stored,
    )
