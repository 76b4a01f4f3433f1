"""What a weight is now: its chain of ops, its form, what it stores, what it decodes to.

A weight is either a float `const` or the root of a chain of constexpr ops (the one op of the
chain that non-constexpr ops read), e.g.

    indices_mask, indices_nonzero_data, lut -> constexpr_lut_to_sparse
        -> (mask, nonzero_data) -> constexpr_sparse_to_dense -> linear.weight

`weight_chain(op)` reads such a chain into a `WeightChain`: its `Form` (dense, sparse,
palettized, quantized, sparse+palettized, sparse+quantized, cast), the bits of its palette or
quantized values, the tensors it stores (name, element count, bits each), and so its bytes in
the weight file, its sparsity when a mask says it, and its decoded value through the reference
interpreter's kernels. `inspect`, `verify` and the passes read this object rather than compare
display strings. Nothing here mutates a program.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil.mil import types
from milsparse.ir import formats
from milsparse.ir.bits import SUB_BYTE_BITS
from milsparse.ir.blobs import release_pages
from milsparse.ir.graph import uses_of
from milsparse.ir.states import Form

__all__ = ["Form", "StoredTensor", "WeightChain", "weight_chain", "is_compressed", "bits_of"]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class StoredTensor:
    """One tensor a weight keeps in the model: `count` elements of `bits` bits each."""

    name: str
    count: int
    bits: int

    @property
    def bytes(self) -> int:
        return formats.tensor_storage_bytes(self.count, self.bits)


@dataclass(frozen=True)
class WeightChain:
    """A weight as the program holds it (see the module docstring)."""

    op: object  # the root: the const, or the constexpr op its consumers read
    ops: tuple  # the chain's constexpr ops, inputs before the ops that read them; () for a const
    form: Form
    shape: tuple[int, ...]
    dtype: str  # the decoded weight's MIL dtype: "fp16", "fp32"
    stored: tuple[StoredTensor, ...]
    nbits: int | None = None  # bits of a palette index or a quantized value
    value_type: str | None = None  # quantized values' MIL dtype: int8, uint8, int4, uint4
    vector_size: int = 1  # palettization: elements per palette entry
    ios16_form: bool = False  # iOS16/17 operands (packed mask or indices with a `shape`)
    mask_sparsity: float | None = None  # fraction of zeros a chain's stored mask tells

    @property
    def sparsity(self) -> float | None:
        """Fraction of zeros: a dense weight's counted on first use (a full pass over the
        values, which selection does not need), a chain's from its mask; None otherwise."""
        if self.form is not Form.DENSE:
            return self.mask_sparsity
        cached = self.__dict__.get("_zeros")
        if cached is None:
            val = self.op.outputs[0].val
            cached = (val.size - int(np.count_nonzero(val))) / val.size
            release_pages(val)  # a mapped weight's pages, read to count, leave memory
            object.__setattr__(self, "_zeros", cached)
        return cached

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def var(self):
        """The value the weight's consumers read."""
        return _weight_var(self.op)

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def stored_bytes(self) -> int:
        return formats.stored_bytes((t.count, t.bits) for t in self.stored)

    @property
    def np_dtype(self) -> np.dtype:
        """The decoded weight's numpy dtype (float16 for "fp16")."""
        return np.dtype(types.nptype_from_builtin(types.string_to_builtin(self.dtype)))

    @property
    def dense_bytes(self) -> int:
        return formats.stored_bytes([(self.num_elements, self.np_dtype.itemsize * 8)])

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.stored_bytes / self.num_elements if self.num_elements else 0.0

    @property
    def label(self) -> str:
        """Short display name: dense, sparse, lut4, int8, sparse+lut4, sparse+uint4, ..."""
        if self.form in (Form.DENSE, Form.SPARSE, Form.CAST):
            text = self.form.value
        else:
            if self.form in (Form.PALETTIZED, Form.SPARSE_PALETTIZED):
                vector = f"x{self.vector_size}" if self.vector_size > 1 else ""
                value = f"lut{self.nbits}{vector}"
                if self.value_type:  # lut4+int8: an int8 table; lut4+scaled: per-channel scales
                    value += f"+{self.value_type}"
            else:
                value = self.value_type
            text = f"sparse+{value}" if self.form.sparse else value
        return text + ("(ios16)" if self.ios16_form else "")

    def decode(self, cache: dict | None = None) -> np.ndarray:
        """The dense weight, as the reference interpreter decodes it (float32 for fp16)."""
        from milsparse.ir.interpreter import static_values

        values = static_values(self.op, cache)
        return values[self.op.outputs.index(self.var)]


def _weight_var(op):
    """The output its consumers read (constexpr_sparse_to_dense has one output; the joint
    ops' first outputs are the mask)."""
    return op.outputs[-1] if op.op_type == "constexpr_sparse_to_dense" else op.outputs[0]


def bits_of(var) -> int:
    """Bits per element of a const var's value (uint1 ... uint6 and int4 included)."""
    name = types.builtin_to_string(var.dtype)
    return SUB_BYTE_BITS.get(name, np.asarray(var.val).dtype.itemsize * 8)


def is_compressed(op) -> bool:
    """True for constexpr ops (an op of a compressed weight's chain)."""
    return op.op_type.startswith("constexpr_")


def weight_chain(op) -> WeightChain | None:
    """The weight whose root is `op`, or None: `op` is not a float const of 10 or more
    elements nor a constexpr op, or its output feeds another constexpr op (it is inside a
    chain, not at its root), or nothing reads it."""
    if op.op_type != "const" and not is_compressed(op):
        return None
    out = _weight_var(op)
    if not types.is_tensor(out.sym_type):
        return None  # a list (a classifier's class labels), a scalar: no weight
    uses = uses_of(out)
    if not uses or any(is_compressed(u.op) for u in uses):
        return None
    shape = tuple(int(d) for d in out.shape)
    dtype = types.builtin_to_string(out.dtype)
    if op.op_type == "const":
        val = out.val
        if (
            not isinstance(val, np.ndarray)
            or val.dtype not in _FLOATS
            or val.size <= formats.INLINE_MAX_ELEMENTS
        ):
            return None
        stored = (StoredTensor("val", val.size, val.dtype.itemsize * 8),)
        return WeightChain(op, (), Form.DENSE, shape, dtype, stored)
    ops = _chain_ops(op)
    kinds = {o.op_type for o in ops}
    stored = tuple(
        StoredTensor(name, int(np.asarray(var.val).size), bits_of(var))
        for o in ops
        for name, var in o.inputs.items()
        if var.op is not None and var.op.op_type == "const"
        and isinstance(var.val, (np.ndarray, np.generic))
        and name not in ("vector_axis", "axis", "output_dtype")  # scalars, no storage
    )  # fmt: skip
    form, nbits, value_type, vector = _form_of(kinds, ops)
    ios16 = any("shape" in o.inputs for o in ops)
    return WeightChain(
        op, ops, form, shape, dtype, stored, nbits, value_type, vector, ios16,
        _mask_sparsity(ops, shape),
    )  # fmt: skip


def _chain_ops(root) -> tuple:
    """The constexpr ops feeding `root` (each once), inputs first, `root` last."""
    order, seen = [], set()

    def visit(op):
        if id(op) in seen:
            return
        seen.add(id(op))
        for var in op.inputs.values():
            if var.op is not None and is_compressed(var.op):
                visit(var.op)
        order.append(op)

    visit(root)
    return tuple(order)


_LUT_OPS = ("constexpr_lut_to_dense", "constexpr_lut_to_sparse")
QUANT_OPS = (  # the ops that scale stored codes
    "constexpr_affine_dequantize",
    "constexpr_blockwise_shift_scale",
    "constexpr_sparse_blockwise_shift_scale",
)


def _form_of(kinds: set, ops: tuple) -> tuple[Form, int | None, str | None, int]:
    """(form, bits of an index or quantized value, quantized values' dtype, vector size)."""
    sparse = "constexpr_sparse_to_dense" in kinds
    lut_op = next((o for o in ops if o.op_type in _LUT_OPS), None)
    quant_op = next((o for o in ops if o.op_type in QUANT_OPS), None)
    if lut_op is not None:
        nbits, vector = _palette_bits(lut_op)
        scaled = None  # a quantized table (int8), or per-channel scales of the table's output
        if quant_op is not None:
            data = quant_op.inputs.get("data")
            kind = types.builtin_to_string(data.dtype) if data is not None else None
            scaled = kind if kind and kind.startswith(("int", "uint")) else "scaled"
        return (Form.SPARSE_PALETTIZED if sparse else Form.PALETTIZED), nbits, scaled, vector
    if quant_op is not None:
        data = next(
            v for n, v in quant_op.inputs.items()
            if n in ("quantized_data", "data", "nonzero_data")
        )  # fmt: skip
        form = Form.SPARSE_QUANTIZED if sparse else Form.QUANTIZED
        return form, bits_of(data), types.builtin_to_string(data.dtype), 1
    if sparse:
        return Form.SPARSE, None, None, 1
    return Form.CAST, None, None, 1


def _palette_bits(lut_op) -> tuple[int, int]:
    lut = lut_op.lut
    if "shape" in lut_op.inputs:  # iOS16: lut T[2^n]
        return int(np.log2(int(np.prod(lut.shape)))), 1
    entries, vector = int(lut.shape[-2]), int(lut.shape[-1])
    return int(np.log2(entries)), vector


def _mask_sparsity(ops: tuple, shape: tuple) -> float | None:
    """Fraction of zeros from the chain's stored mask, if it has one."""
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    for o in ops:
        for name in ("mask", "indices_mask", "data_mask"):
            var = o.inputs.get(name)
            if var is None or var.op is None or var.op.op_type != "const":
                continue
            mask = np.asarray(var.val)
            # iOS16 masks are packed bytes, a bit per element (padding bits are zero); iOS18
            # masks hold 0/1, one per entry of what they mask: an element, or a palettized
            # vector of several (lut4x2's mask has half the weight's size)
            if "shape" in o.inputs:
                ones, covered = int(np.unpackbits(mask).sum()), n
            else:
                ones, covered = int(np.count_nonzero(mask)), max(int(mask.size), 1)
            release_pages(var.val)  # a mapped mask's pages, read to count, leave memory
            return 1.0 - ones / covered
    return None
