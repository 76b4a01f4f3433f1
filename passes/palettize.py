"""milsparse::palettize: rewrite dense weight consts into `constexpr_lut_to_dense`.

Before (linear with a dense fp16 weight)::

    %w = const(val=<fp16 [512, 256]>)
    %y = linear(x=%x, weight=%w, bias=%b)

After, iOS18 target, 4 bits, one table per 32 output channels::

    %w_indices = const(val=<uint4 [512, 256]>)
    %w_lut = const(val=<fp16 [16, 1, 16, 1]>)
    %w = constexpr_lut_to_dense(indices=%w_indices, lut=%w_lut)
    %y = linear(x=%x, weight=%w, bias=%b)

After, iOS16/iOS17 target (one table per tensor only): `lut` fp16[16], `indices` uint8 packed
(4-bit indices LSB first), `shape` uint32[2].

Each table is the exact k-means of the values it stands for (`milsparse.ir.lut`; Lloyd's
algorithm for 8-bit tables), or evenly spaced entries (`mode="uniform"`); every value takes the
nearest entry. A form that would not be smaller than the dense weight is not emitted.

A sparse weight (iOS18 form, e.g. after milsparse::prune) gets the joint form instead: its mask
is kept, its nonzeros are palettized with tables fitted on the nonzeros only, and

    %w_indices_mask = const(val=<uint1 [512, 256]>)
    %w_indices_nonzero_data = const(val=<uint4 [D]>)
    %w_lut = const(val=<fp16 [1, 1, 16, 1]>)
    %m, %nz = constexpr_lut_to_sparse(indices_mask=..., indices_nonzero_data=..., lut=...)
    %w = constexpr_sparse_to_dense(nonzero_data=%nz, mask=%m)

replaces its chain, when that is smaller than the sparse form. Palettized or quantized weights
are left as they are, with that reason.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.passes.pass_registry import register_pass
from milsparse.ir import formats, lut, masks
from milsparse.ir.chain import Form
from milsparse.ir.graph import Use
from milsparse.passes._match import MatchResult
from milsparse.passes._rewrite import named_const, replace_const, replace_op
from milsparse.passes._weight_pass import (
    Candidate,
    WeightPass,
    channel_axes,
    consumers,
    dense_decision,
)
from milsparse.passes.decisions import WeightDecision
from milsparse.passes.lut_config import (
    IOS16_NBITS,
    PalettizeConfig,
    PalettizeSpec,
    parse_palettize_config,
)

__all__ = ["PalettizeWeights", "palettize_tensors"]

_INDEX_TYPES = {n: getattr(types, f"np_uint{n}_dtype") for n in (1, 2, 3, 4, 6)} | {8: np.uint8}


def palettize_tensors(num_elements: int, nbits: int, tables: int, value_bits: int, *, ios18: bool,
                      rank: int = 2) -> list[tuple[int, int]]:  # fmt: skip
    """The tensors of a `constexpr_lut_to_dense` weight: indices, tables (and iOS16's shape)."""
    entries = (tables << nbits, value_bits)
    if ios18:
        return [(num_elements, nbits), entries]
    return [(-(-num_elements * nbits // 8), 8), entries, (rank, 32)]


@register_pass(namespace="milsparse", name="palettize")
class PalettizeWeights(WeightPass):
    """Palettize weight consts into constexpr_lut_to_dense (see the module docstring)."""

    pass_name = "milsparse::palettize"
    emits = "constexpr_lut_to_dense"
    accepts = frozenset({Form.DENSE, Form.SPARSE})

    @staticmethod
    def parse_config(value) -> PalettizeConfig:
        return parse_palettize_config(value)

    def spec_key(self, spec: PalettizeSpec) -> float:
        return -spec.nbits  # more bits: less aggressive

    def prepare(self, op, spec: PalettizeSpec, use: Use, rank: int) -> MatchResult:
        """The output-channel axis for per-group tables; a group size that does not divide the
        channels is refused."""
        if spec.granularity == "per_tensor":
            return MatchResult.ok(None)
        axis = channel_axes(use, rank)[1]
        channels = op.outputs[0].shape[axis]
        if channels % spec.group_size:
            return MatchResult.fail(
                f"{spec.to_string()}: {channels} output channels are not a multiple of "
                f"group_size {spec.group_size}"
            )
        return MatchResult.ok(axis)

    def compress(self, cand: Candidate, ios18: bool) -> WeightDecision:
        if cand.chain.form is Form.SPARSE:
            return self._compress_sparse(cand)
        op, weight, spec = cand.op, cand.weight, cand.spec
        if not ios18:
            if spec.nbits not in IOS16_NBITS or spec.granularity != "per_tensor":
                return dense_decision(
                    op, f"{spec.to_string()} needs iOS18 (iOS16/17 tables are per tensor, "
                    f"with {', '.join(map(str, IOS16_NBITS))} bits); set the target to ios18",
                    cand,
                )  # fmt: skip
        if not masks.all_finite(weight):
            return dense_decision(op, "non-finite values (inf or nan)", cand)
        tables, indices = _fit(weight, spec, cand.axis)
        value_bits = weight.dtype.itemsize * 8
        stored = formats.stored_bytes(
            palettize_tensors(
                weight.size, spec.nbits, tables.shape[0], value_bits, ios18=ios18, rank=weight.ndim
            )  # fmt: skip
        )
        dense = formats.dense_bytes(weight.size, weight.dtype)
        if stored >= dense:
            return dense_decision(
                op, f"palettized form would be larger: {stored} >= {dense} bytes", cand
            )
        decoded_zeros = _decoded_zeros(tables, indices, cand.axis)
        replace_const(op, _builder(op.name, tables, indices, spec.nbits, cand.axis, ios18))
        return WeightDecision(
            name=op.name,
            consumers=consumers(cand.uses),
            shape=tuple(weight.shape),
            dtype=str(weight.dtype),
            compressed=True,
            spec=spec.to_string(),
            axis=cand.axis,
            sparsity=decoded_zeros / weight.size,
            dense_bytes=dense,
            stored_bytes=stored,
            note=cand.note,
        )

    def _compress_sparse(self, cand: Candidate) -> WeightDecision:
        """A sparse weight's nonzeros palettized: the joint iOS18 form, the mask kept as it is,
        the tables fitted on the nonzeros only (no entry is spent on zero)."""
        root, spec, chain = cand.op, cand.spec, cand.chain
        nonzero = np.asarray(root.nonzero_data.val)
        mask = np.asarray(root.mask.val).view(np.uint8)
        if not masks.all_finite(nonzero):
            return dense_decision(root, "non-finite values (inf or nan)", cand)
        groups = None
        if cand.axis is not None:
            channel = np.unravel_index(np.flatnonzero(mask), mask.shape)[cand.axis]
            groups = channel // spec.group_size
        count = 1 if groups is None else mask.shape[cand.axis] // spec.group_size
        tables, indices = _fit_values(nonzero, spec, groups, count)
        stored = formats.stored_bytes(
            [(mask.size, 1), (nonzero.size, spec.nbits), (tables.size, nonzero.itemsize * 8)]
        )
        if stored >= chain.stored_bytes:
            return dense_decision(
                root, f"joint form would not be smaller: {stored} >= {chain.stored_bytes} bytes",
                cand,
            )  # fmt: skip
        shape = [1] * mask.ndim
        if cand.axis is not None:
            shape[cand.axis] = count
        table_value = tables.reshape(*shape, tables.shape[1], 1)
        name = root.name

        def build(anchor, tmp_name):
            bits = named_const(mask.view(types.np_uint1_dtype), f"{name}_indices_mask", anchor)
            codes = named_const(
                indices.astype(_INDEX_TYPES[spec.nbits]), f"{name}_indices_nonzero_data", anchor
            )
            table = named_const(table_value, f"{name}_lut", anchor)
            sparse_mask, values = mb.constexpr_lut_to_sparse(
                indices_mask=bits, indices_nonzero_data=codes, lut=table,
                name=f"{name}_lut_to_sparse", before_op=anchor,
            )  # fmt: skip
            return mb.constexpr_sparse_to_dense(
                nonzero_data=values, mask=sparse_mask, name=tmp_name, before_op=anchor
            )

        replace_op(root, build)
        return WeightDecision(
            name=name,
            consumers=consumers(cand.uses),
            shape=chain.shape,
            dtype=str(nonzero.dtype),
            compressed=True,
            spec=f"sparse+{spec.to_string()}",
            axis=cand.axis,
            sparsity=chain.sparsity or 0.0,
            dense_bytes=chain.dense_bytes,
            stored_bytes=stored,
            note=cand.note,
        )


def _fit_values(values: np.ndarray, spec: PalettizeSpec, groups, count: int):
    """(tables [count, 2^n], uint8 indices) for 1-D `values`, one table per group label."""
    if groups is None:
        table = lut.fit_lut(values, spec.nbits, mode=spec.mode)
        return table[None, :], lut.assign_indices(values, table)
    tables = np.empty((count, 1 << spec.nbits), values.dtype)
    indices = np.empty(values.size, np.uint8)
    for g in range(count):
        members = groups == g
        tables[g] = lut.fit_lut(values[members], spec.nbits, mode=spec.mode)
        indices[members] = lut.assign_indices(values[members], tables[g])
    return tables, indices


def _fit(weight: np.ndarray, spec: PalettizeSpec, axis: int | None):
    """(tables [G, 2^n] in the weight's dtype, indices uint8 with the weight's shape)."""
    if axis is None:
        table = lut.fit_lut(weight.ravel(), spec.nbits, mode=spec.mode)
        return table[None, :], lut.assign_indices(weight, table)
    moved = np.moveaxis(weight, axis, 0)
    groups = moved.shape[0] // spec.group_size
    tables = np.empty((groups, 1 << spec.nbits), weight.dtype)
    indices = np.empty(moved.shape, np.uint8)
    for g in range(groups):
        rows = slice(g * spec.group_size, (g + 1) * spec.group_size)
        tables[g] = lut.fit_lut(moved[rows].ravel(), spec.nbits, mode=spec.mode)
        indices[rows] = lut.assign_indices(moved[rows], tables[g])
    return tables, np.moveaxis(indices, 0, axis)


def _decoded_zeros(tables: np.ndarray, indices: np.ndarray, axis: int | None) -> int:
    zero_entries = tables == 0
    if not zero_entries.any():
        return 0
    if axis is None:
        return int(np.count_nonzero(zero_entries[0][indices]))
    moved = np.moveaxis(indices, axis, 0)
    group = np.repeat(np.arange(tables.shape[0]), moved.shape[0] // tables.shape[0])
    group = group.reshape((-1,) + (1,) * (moved.ndim - 1))
    return int(np.count_nonzero(zero_entries[group, moved]))


def _builder(name, tables, indices, nbits, axis, ios18):
    if ios18:
        shape = [1] * indices.ndim
        if axis is not None:
            shape[axis] = tables.shape[0]
        lut_value = tables.reshape(*shape, tables.shape[1], 1)

        def build(anchor, tmp_name):
            idx = named_const(indices.astype(_INDEX_TYPES[nbits]), f"{name}_indices", anchor)
            table = named_const(lut_value, f"{name}_lut", anchor)
            return mb.constexpr_lut_to_dense(
                indices=idx, lut=table, name=tmp_name, before_op=anchor
            )

        return build
    packed = formats.pack_bits(indices, nbits)
    shape = np.asarray(indices.shape, dtype=np.uint32)

    def build16(anchor, tmp_name):
        return mb.constexpr_lut_to_dense(
            lut=named_const(tables[0], f"{name}_lut", anchor),
            indices=named_const(packed, f"{name}_indices", anchor),
            shape=named_const(shape, f"{name}_shape", anchor),
            name=tmp_name,
            before_op=anchor,
        )

    return build16
