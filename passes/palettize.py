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

import attrs
import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from milsparse.ir import formats, lut
from milsparse.ir.bits import pack_bits
from milsparse.ir.chain import Form
from milsparse.ir.errors import ConfigError
from milsparse.ir.graph import Use
from milsparse.passes import catalog
from milsparse.passes._match import MatchResult
from milsparse.passes._rewrite import Rewrites
from milsparse.passes._weight_pass import (
    Candidate,
    WeightPass,
    channel_axes,
    compressed_decision,
    dense_decision,
)
from milsparse.passes.decisions import WeightDecision
from milsparse.passes.lut_config import (
    IOS16_NBITS,
    NBITS,
    PalettizeConfig,
    PalettizeSpec,
    parse_palettize_config,
)
from milsparse.passes.registry import graph_pass

__all__ = ["PalettizeWeights", "palettize_tensors"]

_INDEX_TYPES = {n: getattr(types, f"np_uint{n}_dtype") for n in (1, 2, 3, 4, 6)} | {8: np.uint8}


def palettize_tensors(num_elements: int, nbits: int, tables: int, value_bits: int, *, ios18: bool,
                      rank: int = 2) -> list[tuple[int, int]]:  # fmt: skip
    """The tensors of a `constexpr_lut_to_dense` weight: indices, tables (and iOS16's shape)."""
    entries = (tables << nbits, value_bits)
    if ios18:
        return [(num_elements, nbits), entries]
    return [(-(-num_elements * nbits // 8), 8), entries, (rank, 32)]


@graph_pass(catalog.PALETTIZE)
class PalettizeWeights(WeightPass):
    """Palettize weight consts into constexpr_lut_to_dense (see the module docstring)."""

    pass_name = "milsparse::palettize"
    emits = "constexpr_lut_to_dense"
    accepts = frozenset({Form.DENSE, Form.SPARSE})

    @staticmethod
    def parse_config(value) -> PalettizeConfig:
        return parse_palettize_config(value)

    def spec_key(self, spec: PalettizeSpec) -> float:
        return -(spec.nbits or 8)  # more bits: less aggressive (unique and custom: the most)

    def prepare(self, op, spec: PalettizeSpec, use: Use, rank: int) -> MatchResult:
        """The output-channel axis for per-group tables and vectors; channels that group_size
        or cluster_dim do not divide are refused."""
        if (
            spec.granularity == "per_tensor"
            and spec.cluster_dim == 1
            and not spec.per_channel_scale
        ):
            return MatchResult.ok(None)
        axis = channel_axes(use, rank)[1]
        if spec.channel_axis is not None:
            if not -rank <= spec.channel_axis < rank:
                return MatchResult.fail(
                    f"{spec.to_string()}: channel_axis {spec.channel_axis} of a weight of rank "
                    f"{rank}"
                )
            axis = spec.channel_axis % rank
        channels = op.outputs[0].shape[axis]
        along = "output channels" if spec.channel_axis is None else f"channels of axis {axis}"
        for size, what in (
            (spec.group_size if spec.granularity == "per_grouped_channel" else 1, "group_size"),
            (spec.cluster_dim, "cluster_dim"),
        ):
            if channels % size:
                return MatchResult.fail(
                    f"{spec.to_string()}: {channels} {along} are not a multiple of {what} {size}"
                )
        return MatchResult.ok(axis)

    def compress(self, cand: Candidate, ios18: bool, rewrites: Rewrites) -> WeightDecision:
        op, spec = cand.op, cand.spec
        if not ios18 and not spec.ios16_compatible:
            return dense_decision(
                op, f"{spec.to_string()} needs iOS18 (iOS16/17 tables are per tensor and scalar, "
                f"with {', '.join(map(str, IOS16_NBITS))} bits); set the target to ios18",
                cand,
            )  # fmt: skip
        if cand.chain.form is Form.SPARSE:
            if spec.per_channel_scale:
                return dense_decision(
                    op, f"{spec.to_string()}: per-channel scales of a sparse weight's nonzeros "
                    "are not supported (palettize without @pcs)", cand,
                )  # fmt: skip
            return self._compress_sparse(cand, rewrites)
        weight = cand.weight
        layout = _Layout(weight.shape, cand.axis, spec)
        scales = None
        if spec.per_channel_scale:
            weight, scales = _per_channel_scaled(weight, cand.axis)
        if spec.mode == "custom":
            tables, indices, spec = _custom_fit(op.name, weight, layout, spec, ios18)
        else:
            groups = layout.dense_groups()
            if spec.mode == "unique":
                spec, reason = _unique_bits(layout.vectors(weight), groups, spec, layout.count,
                                            ios18)  # fmt: skip
                if reason is not None:
                    return dense_decision(op, reason, cand)
            importance = self.importance(cand, weight.shape)
            weights = None if importance is None else layout.vectors(importance)
            tables, indices = _fit(layout.vectors(weight), groups, spec, layout.count, weights)
        indices = indices.reshape(layout.indices_shape)
        value_bits = weight.dtype.itemsize * 8
        stored = formats.stored_bytes(
            palettize_tensors(
                indices.size,
                spec.nbits,
                tables.shape[0] * spec.cluster_dim,
                value_bits,
                ios18=ios18,
                rank=weight.ndim,
            )  # fmt: skip
            + ([] if scales is None else [(scales.size, value_bits)])
        )
        dense = formats.dense_bytes(weight.size, weight.dtype)
        if stored >= dense:
            return dense_decision(
                op, f"palettized form would be larger: {stored} >= {dense} bytes", cand
            )
        decoded_zeros = layout.decoded_zeros(tables, indices)
        build = _builder(op.name, tables, indices, spec, layout, ios18)
        rewrites.replace(op, build if scales is None else _scaled(op.name, build, scales))
        return compressed_decision(
            cand,
            shape=weight.shape,
            dtype=weight.dtype,
            spec=spec.to_string(),
            sparsity=decoded_zeros / weight.size,
            dense_bytes=dense,
            stored_bytes=stored,
        )

    def _compress_sparse(self, cand: Candidate, rewrites: Rewrites) -> WeightDecision:
        """A sparse weight's nonzeros palettized: the joint iOS18 form, the mask kept as it is,
        the tables fitted on the nonzeros only (no entry is spent on zero). With vectors, the
        mask must keep or drop each vector of cluster_dim output channels whole (block pruning
        along the output channels does)."""
        root, spec, chain = cand.op, cand.spec, cand.chain
        nonzero = np.asarray(root.nonzero_data.val)
        mask = np.asarray(root.mask.val).view(np.uint8)
        layout = _Layout(mask.shape, cand.axis, spec)
        if spec.cluster_dim > 1:
            vector_mask = layout.vectors(mask)
            kept = vector_mask[..., 0]
            if not (vector_mask == kept[..., None]).all():
                return dense_decision(
                    root, f"{spec.to_string()}: the mask does not keep or drop each vector of "
                    f"{spec.cluster_dim} output channels whole; prune with "
                    f"block{spec.cluster_dim}@out (or a multiple) to palettize with vectors",
                    cand,
                )  # fmt: skip
            dense = np.zeros(mask.shape, nonzero.dtype)
            dense[mask.astype(bool)] = nonzero
            vectors = layout.vectors(dense)[kept.astype(bool)]
            indices_mask = kept
            weights = None  # vector k-means is not weighted
        else:
            vectors, indices_mask = nonzero[:, None], mask
            importance = self.importance(cand, mask.shape)
            weights = None if importance is None else importance[mask.astype(bool)][:, None]
        groups = layout.sparse_groups(indices_mask)
        if spec.mode == "custom":
            return dense_decision(
                root, "mode custom palettizes dense weights (its lut_function sees every value)",
                cand,
            )  # fmt: skip
        if spec.mode == "unique":
            spec, reason = _unique_bits(vectors, groups, spec, layout.count, True)
            if reason is not None:
                return dense_decision(root, reason, cand)
        tables, indices = _fit(vectors, groups, spec, layout.count, weights)
        value_bits = nonzero.itemsize * 8
        stored = formats.stored_bytes(
            [(indices_mask.size, 1), (indices.size, spec.nbits), (tables.size, value_bits)]
        )
        if stored >= chain.stored_bytes:
            return dense_decision(
                root, f"joint form would not be smaller: {stored} >= {chain.stored_bytes} bytes",
                cand,
            )  # fmt: skip
        table_value = layout.lut_value(tables)
        name = root.name

        def build(site, tmp_name):
            if spec.cluster_dim == 1:
                bits = root.mask  # the same mask: the const is shared, not copied
            else:
                bits = site.const(
                    indices_mask.astype(np.uint8).view(types.np_uint1_dtype), f"{name}_indices_mask"
                )
            codes = site.const(
                indices.astype(_INDEX_TYPES[spec.nbits]), f"{name}_indices_nonzero_data"
            )
            table = site.const(table_value, f"{name}_lut")
            vector = {} if spec.cluster_dim == 1 else {"vector_axis": np.int32(cand.axis)}
            sparse_mask, values = mb.constexpr_lut_to_sparse(
                indices_mask=bits, indices_nonzero_data=codes, lut=table, **vector,
                name=f"{name}_lut_to_sparse", before_op=site.op,
            )  # fmt: skip
            return mb.constexpr_sparse_to_dense(
                nonzero_data=values, mask=sparse_mask, name=tmp_name, before_op=site.op
            )

        rewrites.replace(root, build)
        return compressed_decision(
            cand,
            shape=chain.shape,
            dtype=nonzero.dtype,
            spec=f"sparse+{spec.to_string()}",
            sparsity=chain.sparsity,
            dense_bytes=chain.dense_bytes,
            stored_bytes=stored,
        )


class _Layout:
    """Where a weight's table entries come from: with `axis` (the output channels) and
    cluster_dim V, the weight [..., C, ...] is seen as vectors [..., C/V, ..., V] (V consecutive
    channels each), whose leading shape is the shape of the indices; group g of the tables
    covers indices g * group_size/V ... along the axis."""

    def __init__(self, shape, axis: int | None, spec: PalettizeSpec):
        self.shape, self.axis, self.spec = tuple(shape), axis, spec
        self.vector = spec.cluster_dim
        indices_shape = list(self.shape)
        if axis is not None:
            indices_shape[axis] //= self.vector
        self.indices_shape = tuple(indices_shape)
        grouped = spec.granularity == "per_grouped_channel"
        self.per_group = spec.group_size // self.vector if grouped else None
        self.count = indices_shape[axis] // self.per_group if grouped else 1

    def vectors(self, array: np.ndarray) -> np.ndarray:
        """`array` as [*indices_shape, V] (a view when V == 1)."""
        if self.vector == 1:
            return array[..., None]
        a = self.axis
        split = array.reshape(self.shape[:a] + (self.indices_shape[a], self.vector)
                              + self.shape[a + 1 :])  # fmt: skip
        return np.moveaxis(split, a + 1, -1)

    def dense_groups(self) -> np.ndarray | None:
        """Group label of every index, in C order; None for one table."""
        if self.count == 1:
            return None
        shape = [1] * len(self.indices_shape)
        shape[self.axis] = self.indices_shape[self.axis]
        labels = (np.arange(shape[self.axis], dtype=np.int32) // self.per_group).reshape(shape)
        return np.broadcast_to(labels, self.indices_shape).ravel()

    def sparse_groups(self, indices_mask: np.ndarray) -> np.ndarray | None:
        """Group label of every kept index, in C order."""
        if self.count == 1:
            return None
        kept = np.unravel_index(np.flatnonzero(indices_mask), indices_mask.shape)[self.axis]
        return kept // self.per_group

    def lut_value(self, tables: np.ndarray) -> np.ndarray:
        """tables [G, 2^n, V] as the iOS18 lut [1.., G at the axis, 1.., 2^n, V]."""
        shape = [1] * len(self.indices_shape)
        if self.count > 1:
            shape[self.axis] = self.count
        return tables.reshape(*shape, *tables.shape[1:])

    def decoded_zeros(self, tables: np.ndarray, indices: np.ndarray) -> int:
        zeros_per_entry = (tables == 0).sum(-1)  # [G, 2^n]
        if not zeros_per_entry.any():
            return 0
        labels = self.dense_groups()
        flat = indices.ravel()
        if labels is None:
            return int(zeros_per_entry[0][flat].sum())
        return int(zeros_per_entry[labels, flat].sum())


def _per_channel_scaled(weight: np.ndarray, axis: int):
    """(the weight divided by its largest magnitude along `axis`, those scales), as
    coremltools' enable_per_channel_scale makes them (an all-zero line keeps scale 1); the
    division in float64, rounded once to the weight's dtype."""
    scales = np.max(np.abs(weight), axis=axis, keepdims=True)
    scales[scales == 0] = 1
    return (weight.astype(np.float64) / scales).astype(weight.dtype), scales


def _scaled(name: str, build, scales: np.ndarray):
    """`build`'s table op read by a constexpr_blockwise_shift_scale of `scales`."""

    def build_scaled(site, tmp_name):
        table = build(site, f"{name}_palettized")
        return mb.constexpr_blockwise_shift_scale(
            data=table, scale=site.const(scales, f"{name}_per_channel_scale"), name=tmp_name,
            before_op=site.op,
        )  # fmt: skip

    return build_scaled


def _parts(groups: np.ndarray | None, count: int) -> list:
    """The members of each group label 0..count-1 (slices when contiguous); [None]: one set."""
    if groups is None:
        return [None]  # the whole set
    if np.all(groups[1:] >= groups[:-1]):  # output channels first: contiguous groups
        bounds = np.searchsorted(groups, np.arange(count + 1))
        return [slice(bounds[g], bounds[g + 1]) for g in range(count)]
    order = np.argsort(groups, kind="stable")
    bounds = np.searchsorted(groups[order], np.arange(count + 1))
    return [order[bounds[g] : bounds[g + 1]] for g in range(count)]


def _bits_of(ios18: bool) -> tuple[int, ...]:
    """The index widths the target's tables take, fewest first."""
    return NBITS if ios18 else IOS16_NBITS


def _fewest_bits(entries: int, allowed: tuple[int, ...]) -> int | None:
    """The fewest of `allowed` bits whose tables hold `entries` entries, or None."""
    return next((n for n in allowed if entries <= 1 << n), None)


# coremltools' words (its users and tests look for them in the warning)
_MOST_DISTINCT = "Unique values in weight cannot be represented by 8 bits palettization."


def _unique_bits(vectors, groups, spec: PalettizeSpec, count: int, ios18: bool):
    """(spec with the fewest bits whose tables hold every group's distinct values, None), or
    (spec, the reason the weight stays dense)."""
    vectors = vectors.reshape(-1, vectors.shape[-1])
    most = max(
        len(np.unique(vectors if m is None else vectors[m], axis=0)) for m in _parts(groups, count)
    )
    nbits = _fewest_bits(most, (spec.nbits,) if spec.nbits is not None else _bits_of(ios18))
    if nbits is not None:
        return attrs.evolve(spec, nbits=nbits), None
    if spec.nbits is not None:
        held = 1 << spec.nbits
        return spec, f"{most} distinct values in a table; {spec.to_string()} holds {held}"
    return spec, f"{_MOST_DISTINCT} It has {most} distinct values in a table (at most 256)."


def _custom_fit(name: str, weight: np.ndarray, layout: _Layout, spec: PalettizeSpec, ios18: bool):
    """(tables [G, 2^n, 1], indices [weight's shape], spec with n) from the user's
    `lut_function`, called as coremltools calls it: once per table, on that group's values with
    the output channels first (the whole weight for one table)."""
    axis = layout.axis or 0
    moved = np.swapaxes(weight, 0, axis)
    groups = np.split(moved, layout.count, axis=0)
    luts, codes = [], []
    for part in groups:
        lut_values, idx = spec.lut_function(part)
        lut_values, idx = np.asarray(lut_values), np.asarray(idx)
        if lut_values.ndim != 1 or not 1 <= lut_values.size <= 256:
            raise ConfigError(
                f"{name}: lut_function returned a table of shape {lut_values.shape}; it must be "
                "1-D with 1 to 256 entries"
            )
        if (
            idx.size != part.size
            or idx.dtype.kind not in "ui"
            or (idx.size and (idx.min() < 0 or idx.max() >= lut_values.size))
        ):
            raise ConfigError(
                f"{name}: lut_function returned {idx.size} indices of {idx.dtype}; it must give "
                f"one integer index into its table per value ({part.size})"
            )
        luts.append(lut_values)
        codes.append(idx.reshape(part.shape).astype(np.uint8))
    nbits = _fewest_bits(max(t.size for t in luts), _bits_of(ios18))  # at most 256: checked
    tables = np.zeros((layout.count, 1 << nbits, 1), weight.dtype)
    for g, t in enumerate(luts):
        tables[g, : t.size, 0] = t.astype(weight.dtype)
    indices = np.swapaxes(np.concatenate(codes, axis=0), 0, axis)
    return tables, np.ascontiguousarray(indices), attrs.evolve(spec, nbits=nbits)


def _fit(
    vectors: np.ndarray,
    groups: np.ndarray | None,
    spec: PalettizeSpec,
    count: int = 1,
    weights: np.ndarray | None = None,
):
    """(tables [count, 2^n, V] in the values' dtype, uint8 indices [N]) for `vectors`
    [..., V] (flattened to [N, V]), one table per group label 0..count-1 (None: one table).
    A group without values gets a zero table. `weights` (same layout, scalar tables only)
    scale each value's squared error in the k-means (activation energy)."""
    vectors = vectors.reshape(-1, vectors.shape[-1])
    if weights is not None:
        weights = np.asarray(weights, np.float64).reshape(-1, weights.shape[-1])
    tables = np.empty((count, 1 << spec.nbits, vectors.shape[1]), vectors.dtype)
    indices = np.empty(vectors.shape[0], np.uint8)
    for g, members in enumerate(_parts(groups, count)):
        subset = vectors if members is None else vectors[members]
        if spec.mode == "unique":
            entries, codes = np.unique(subset, axis=0, return_inverse=True)
            table = np.zeros((1 << spec.nbits, subset.shape[1]), subset.dtype)
            table[: len(entries)] = entries
            codes = codes.ravel()
        elif spec.cluster_dim == 1:
            values = subset[:, 0]
            importance = None
            if weights is not None:
                importance = (weights if members is None else weights[members])[:, 0]
            table = lut.fit_lut(values, spec.nbits, importance=importance, mode=spec.mode)
            codes = lut.assign_indices(values, table)
            table = table[:, None]
        else:
            table = lut.fit_vector_lut(subset, spec.nbits)
            codes = lut.assign_vector_indices(subset, table)
        tables[g] = table
        if members is None:
            indices[:] = codes
        else:
            indices[members] = codes
    return tables, indices


def _builder(name, tables, indices, spec: PalettizeSpec, layout: _Layout, ios18: bool):
    if ios18:
        lut_value = layout.lut_value(tables)
        vector = {} if spec.cluster_dim == 1 else {"vector_axis": np.int32(layout.axis)}

        def build(site, tmp_name):
            idx = site.const(indices.astype(_INDEX_TYPES[spec.nbits]), f"{name}_indices")
            table = site.const(lut_value, f"{name}_lut")
            return mb.constexpr_lut_to_dense(
                indices=idx, lut=table, name=tmp_name, before_op=site.op, **vector
            )

        return build
    packed = pack_bits(indices, spec.nbits)
    shape = np.asarray(indices.shape, dtype=np.uint32)

    def build16(site, tmp_name):
        return mb.constexpr_lut_to_dense(
            lut=site.const(tables[0, :, 0], f"{name}_lut"),
            indices=site.const(packed, f"{name}_indices"),
            shape=site.const(shape, f"{name}_shape"),
            name=tmp_name,
            before_op=site.op,
        )

    return build16
