"""milsparse::quantize: linear quantization of weights, w ~ (q - offset) * scale.

Before (linear with a dense fp16 weight)::

    %w = const(val=<fp16 [512, 256]>)

After, iOS18, int4 per output channel and block of 32 input channels::

    %w_data = const(val=<int4 [512, 256]>)
    %w_scale = const(val=<fp16 [512, 8]>)
    %w = constexpr_blockwise_shift_scale(data=%w_data, scale=%w_scale)

iOS16/iOS17 (int8/uint8, per tensor or per channel): `constexpr_affine_dequantize`
(`quantized_data`, `zero_point`, `scale`, `axis`). A sparse iOS18 weight gets the joint form,
its ranges taken from its nonzeros only::

    %m, %nz = constexpr_sparse_blockwise_shift_scale(data_mask=<uint1>, nonzero_data=<int8 [D]>,
                                                      scale=..., offset=...)
    %w = constexpr_sparse_to_dense(nonzero_data=%nz, mask=%m)

Scales are stored in the weight's dtype and chosen there (`fit_scales`): the stored scale
decodes every value, as the constexpr ops decode it in the weight's dtype, finite and within
half a step of its value (fp16 weights near 65504, tiny weights with subnormal scales); the
values are rounded against the stored scale. With calibration, a group's range may be shrunk
by `CLIP_RATIOS`: values beyond it take the extreme level. A form that would not be smaller
than what the weight already is is not emitted.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from milsparse.ir import formats
from milsparse.ir.chain import Form, bits_of
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
from milsparse.passes.quant_config import (
    QuantizeConfig,
    QuantizeSpec,
    parse_quantize_config,
)
from milsparse.passes.registry import graph_pass

__all__ = ["QuantizeWeights", "UnrepresentableScaleError", "fit_scales", "quantize_blockwise"]

_IOS26 = AvailableTarget.iOS26  # its joint int8-table form is ordered the other way round
_STORAGE = {
    "int8": np.int8,
    "uint8": np.uint8,
    "int4": types.np_int4_dtype,
    "uint4": types.np_uint4_dtype,
}


CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 ... 0.5


def quantize_blockwise(
    weight: np.ndarray, scale_shape, spec: QuantizeSpec, valid=None, importance=None
):
    """(q int16, scale in the weight's dtype, offset int64 or None), each group of `weight`
    (the blocks `scale_shape` divides it into) quantized on its own; `valid` (a boolean mask)
    limits the ranges to those values (a sparse weight's nonzeros).

    With `importance` (per element: the activation energy of its input column), each group's
    range is shrunk by the ratio of CLIP_RATIOS whose quantization has the least
    importance-weighted squared error (clipping a few large weights buys a finer step for the
    ones the activations make matter); without it the range is the group's full range.

    fp16 weights are worked in float32 (exact for their values; `x / scale` of two fp16
    numbers lies at least 2^-12 from a rounding midpoint unless it is one, far beyond float32's
    error, so the levels are those float64 gives), fp32 weights in float64; one working copy,
    updated in place."""
    if importance is not None:
        return _weighted_blockwise(weight, scale_shape, spec, valid, importance)
    rank = weight.ndim
    view = [x for d in range(rank) for x in (scale_shape[d], weight.shape[d] // scale_shape[d])]
    inner = tuple(range(1, 2 * rank, 2))
    work = np.float32 if weight.dtype == np.float16 else np.float64
    x = np.asarray(weight).astype(work).reshape(view)
    if valid is None:
        lo = x.min(axis=inner, keepdims=True).astype(np.float64)
        hi = x.max(axis=inner, keepdims=True).astype(np.float64)
    else:
        where = np.asarray(valid, bool).reshape(view)
        lo = np.min(x, axis=inner, keepdims=True, where=where, initial=np.inf).astype(np.float64)
        hi = np.max(x, axis=inner, keepdims=True, where=where, initial=-np.inf).astype(np.float64)
    empty = ~np.isfinite(lo)
    lo, hi = np.where(empty, 0.0, lo), np.where(empty, 0.0, hi)
    if spec.mode == "linear":
        # The offset is stored in the quantized dtype, so 0 is always a level: a range that
        # does not reach it would clip (and a dense weight's zeros stay exact).
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale, offset = fit_scales(lo, hi, spec, np.dtype(weight.dtype))
    stored = scale.astype(np.float64)
    np.divide(x, stored.astype(work), out=x)
    np.rint(x, out=x)
    if offset is not None:
        x += offset.astype(work)
    np.clip(x, *_levels(spec), out=x)
    q = x.astype(np.int16)
    shape = tuple(scale_shape)
    return (
        q.reshape(weight.shape),
        scale.reshape(shape),
        None if offset is None else offset.reshape(shape),
    )


# Steps of the stored dtype a scale may move either side of the nearest one to fit its group.
_NUDGES = 4


class UnrepresentableScaleError(ValueError):
    """No stored scale near the ideal one decodes a group's values finite and within half a
    step (not expected for finite weights; the pass leaves such a weight dense)."""


def _levels(spec: QuantizeSpec) -> tuple[int, int]:
    half = 1 << (spec.nbits - 1)
    return (-half, half - 1) if spec.signed else (0, 2 * half - 1)


def _ideal_scales(lo, hi, spec: QuantizeSpec):
    """Each group's scale in float64 (0 for a group of zeros) and the offset of a symmetric
    spec (None for signed; the middle of the range for unsigned; None to compute for affine)."""
    qmin, qmax = _levels(spec)
    half = 1 << (spec.nbits - 1)
    largest = np.maximum(np.abs(lo), np.abs(hi))
    if spec.mode == "linear_symmetric":
        offset = None if spec.signed else np.full(lo.shape, half, np.int64)
        return largest / (half - 1), offset
    return (hi - lo) / (qmax - qmin), None


def _affine_offsets(lo, scale, spec: QuantizeSpec):
    qmin, qmax = _levels(spec)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(np.rint(qmin - lo / scale), qmin, qmax).astype(np.int64)


def _decode_fits(lo, hi, scale, offset, spec: QuantizeSpec, dtype) -> np.ndarray:
    """Per group, whether `scale` (stored, in `dtype`) decodes the group's extremes `lo` and
    `hi` finite and within half a step (plus the decoder's rounding of the product to
    `dtype`). Levels grow with the values and only the extremes can be clipped, so these two
    speak for every value between them. The decode is coremltools' (and the iOS16/iOS18
    constexpr ops'): (q - offset) in float32, times the scale in float32, cast to `dtype`."""
    qmin, qmax = _levels(spec)
    step = scale.astype(np.float64)
    shift = 0 if offset is None else offset
    fits = step > 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for x in (lo, hi):
            level = np.clip(np.rint(x / step) + shift, qmin, qmax)
            product = (level - shift).astype(np.float32) * scale.astype(np.float32)
            decoded = product.astype(dtype)
            half_ulp = np.spacing(np.abs(decoded)).astype(np.float64) / 2
            error = np.abs(decoded.astype(np.float64) - x)
            fits &= np.isfinite(decoded) & (error <= step / 2 + half_ulp)
    return fits


def fit_scales(lo, hi, spec: QuantizeSpec, dtype):
    """(scale in `dtype`, offset int64 or None) of each group with range [lo, hi] (float64).

    The scale is the one the model stores, so it is chosen in `dtype`: the nearest to the
    ideal one when it decodes the group finite and within half a step (`_decode_fits`), else
    the fitting candidate nearest to the ideal one (`_scale_candidates`). The nearest fails
    when it rounds up and the top level overflows (65504 / 127 is 516.0 in fp16, and 127 x 516
    is inf), and when it rounds down to a subnormal, or to 0, below what the range needs (tiny
    weights). Raises UnrepresentableScaleError if no candidate fits."""
    ideal, fixed_offset = _ideal_scales(lo, hi, spec)
    nearest = np.where(ideal > 0, ideal, 1.0).astype(dtype)

    def offsets(scale):
        if spec.mode != "linear":
            return fixed_offset
        return _affine_offsets(lo, scale.astype(np.float64), spec)

    fits = _decode_fits(lo, hi, nearest, offsets(nearest), spec, dtype)
    if fits.all():  # the common case: one check of two values per group
        return nearest, offsets(nearest)
    best, gap = nearest, np.where(fits, 0.0, np.inf)
    for candidate in _scale_candidates(lo, hi, ideal, nearest, dtype):
        fitting = ~fits & _decode_fits(lo, hi, candidate, offsets(candidate), spec, dtype)
        distance = np.abs(candidate.astype(np.float64) - ideal)
        better = fitting & (distance < gap)
        best, gap = np.where(better, candidate, best), np.where(better, distance, gap)
    if np.isinf(gap).any():
        raise UnrepresentableScaleError(
            f"{int(np.isinf(gap).sum())} of {gap.size} groups have no {np.dtype(dtype)} scale "
            "that decodes their values finite and within half a step"
        )
    return best, offsets(best)


def _scale_candidates(lo, hi, ideal, nearest, dtype):
    """Scales in `dtype` to try for groups the nearest one does not fit: up to `_NUDGES`
    steps of `dtype` either side of it (a rounding or a subnormal's coarse steps), and, for
    each extreme x, the smallest scale that takes x one or two levels lower (|x| / (k + 1/2)
    rounded up): the top level of a range that reaches the dtype's largest values must stay
    finite, at the cost of a coarser step."""
    up, down = nearest, nearest
    for _ in range(_NUDGES):
        up, down = np.nextafter(up, dtype.type(np.inf)), np.nextafter(down, dtype.type(0))
        yield up
        yield down
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for x in (lo, hi):
            magnitude = np.abs(x)
            level = np.rint(magnitude / np.where(ideal > 0, ideal, 1.0))
            for fewer in (1, 2):
                k = level - fewer
                target = np.where(k >= 1, magnitude / (k + 0.5), nearest.astype(np.float64))
                scale = target.astype(dtype)
                yield np.where(scale.astype(np.float64) <= target, np.nextafter(
                    scale, dtype.type(np.inf)), scale)  # fmt: skip


def _weighted_blockwise(weight, scale_shape, spec, valid, importance):
    """`quantize_blockwise` with each group's range shrunk by its best CLIP_RATIOS ratio."""
    rank = weight.ndim
    view = [x for d in range(rank) for x in (scale_shape[d], weight.shape[d] // scale_shape[d])]
    inner = tuple(range(1, 2 * rank, 2))
    w = np.asarray(weight, np.float64).reshape(view)
    imp = np.asarray(importance, np.float64).reshape(view)
    if valid is not None:
        imp = imp * np.asarray(valid, bool).reshape(view)
    at = [x for d in range(rank) for x in (scale_shape[d], 1)]  # a group's value, broadcast
    best_err, best = None, None
    for ratio in CLIP_RATIOS:
        q, scale, offset = _quantize_with_ratio(weight, scale_shape, spec, valid, ratio)
        shift = 0 if offset is None else offset.reshape(at)
        stored = scale.astype(np.float64).reshape(at)
        decoded = (q.reshape(view).astype(np.float64) - shift) * stored
        err = (imp * (decoded - w) ** 2).sum(axis=inner, keepdims=True)
        if best is None:
            best_err, best = err, [q.reshape(view).copy(), scale.copy(),
                                   None if offset is None else offset.copy()]  # fmt: skip
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best[0] = np.where(better, q.reshape(view), best[0])
        flat_better = better.reshape(scale.shape)
        best[1] = np.where(flat_better, scale, best[1])
        if offset is not None:
            best[2] = np.where(flat_better, offset, best[2])
    return best[0].reshape(weight.shape), best[1], best[2]


def _quantize_with_ratio(weight, scale_shape, spec, valid, ratio):
    """`quantize_blockwise` of the weight with every group's range scaled by `ratio`: values
    beyond it clip to the extreme levels."""
    if ratio == 1.0:
        return quantize_blockwise(weight, scale_shape, spec, valid)
    rank = weight.ndim
    view = [x for d in range(rank) for x in (scale_shape[d], weight.shape[d] // scale_shape[d])]
    inner = tuple(range(1, 2 * rank, 2))
    w = np.asarray(weight, np.float64).reshape(view)
    where = True if valid is None else np.asarray(valid, bool).reshape(view)
    lo = np.min(w, axis=inner, keepdims=True, where=where, initial=np.inf)
    hi = np.max(w, axis=inner, keepdims=True, where=where, initial=-np.inf)
    lo = np.where(np.isfinite(lo), lo, 0.0) * ratio
    hi = np.where(np.isfinite(hi), hi, 0.0) * ratio
    clipped = np.clip(w, lo, hi).reshape(weight.shape).astype(weight.dtype)
    # the clipped values' levels are the originals' too: beyond the range, the extreme level
    return quantize_blockwise(clipped, scale_shape, spec, valid)


@graph_pass(catalog.QUANTIZE)
class QuantizeWeights(WeightPass):
    """Linearly quantize weight consts (see the module docstring)."""

    pass_name = "milsparse::quantize"
    emits = "constexpr_affine_dequantize"
    accepts = frozenset({Form.DENSE, Form.SPARSE, Form.PALETTIZED})

    _opset = None  # the function's, set before any of its weights (workers only read it)

    def check_function(self, fname: str, opset) -> bool:
        self._opset = opset
        return super().check_function(fname, opset)

    @staticmethod
    def parse_config(value) -> QuantizeConfig:
        return parse_quantize_config(value)

    def spec_key(self, spec: QuantizeSpec) -> float:
        return -spec.nbits

    def prepare(self, op, spec: QuantizeSpec, use: Use, rank: int) -> MatchResult:
        """(input axis, output axis) of the weight; a block size that does not divide the
        input channels is refused."""
        axes = channel_axes(use, rank)
        if spec.block_shape is not None:
            shape = op.outputs[0].shape
            if len(spec.block_shape) != rank:
                return MatchResult.fail(
                    f"{spec.to_string()}: {len(spec.block_shape)} block sizes for a weight of "
                    f"rank {rank}"
                )
            for d, (n, b) in enumerate(zip(shape, spec.block_shape, strict=True)):
                if b and n % b:
                    return MatchResult.fail(
                        f"{spec.to_string()}: axis {d} ({n}) is not a multiple of its block {b}"
                    )
        elif spec.granularity == "per_block":
            channels = op.outputs[0].shape[axes[0]]
            if channels % spec.block_size:
                return MatchResult.fail(
                    f"{spec.to_string()}: {channels} input channels are not a multiple of "
                    f"block_size {spec.block_size}"
                )
        return MatchResult.ok(axes)

    def compress(self, cand: Candidate, ios18: bool, rewrites: Rewrites) -> WeightDecision:
        op, spec, chain = cand.op, cand.spec, cand.chain
        if chain.form is Form.PALETTIZED:
            return self._compress_table(cand, ios18, rewrites)
        sparse = chain.form is Form.SPARSE
        if not ios18 and (spec.nbits != 8 or spec.granularity == "per_block"):
            return dense_decision(
                op, f"{spec.to_string()} needs iOS18 (iOS16/17 quantize to int8 or uint8, per "
                "tensor or per channel); set the target to ios18", cand,
            )  # fmt: skip
        dtype = chain.np_dtype
        weight = cand.weight if not sparse else chain.decode().astype(dtype)
        mask = np.asarray(op.mask.val).view(np.uint8) if sparse else None
        shape = _scale_shape(weight.shape, spec, cand.axis)
        importance = self.importance(cand, weight.shape)
        try:
            q, scale, offset = quantize_blockwise(
                weight, shape, spec, None if mask is None else mask, importance
            )
        except UnrepresentableScaleError as e:
            return dense_decision(op, f"{spec.to_string()}: {e}", cand)
        # iOS16's constexpr_affine_dequantize always stores a zero point
        zero_points = offset is not None or not ios18
        tables = [(scale.size, dtype.itemsize * 8)] + (
            [(scale.size, spec.nbits)] if zero_points else []
        )
        data = [(int(mask.sum()), spec.nbits), (mask.size, 1)] if sparse else [(q.size, spec.nbits)]
        stored = formats.stored_bytes(data + tables)
        if stored >= chain.stored_bytes:
            return dense_decision(
                op, f"quantized form would not be smaller: {stored} >= {chain.stored_bytes} "
                "bytes", cand,
            )  # fmt: skip
        # a sparse weight's sparsity is its mask's; a dense one's, the values that decode to 0
        sparsity = chain.sparsity if sparse else _zero_levels(q, offset, shape) / q.size
        build = _builder(op.name, q, scale, offset, spec, mask, ios18, cand.axis[1])
        rewrites.replace(op, build)
        return compressed_decision(
            cand,
            shape=chain.shape,
            dtype=dtype,
            spec=("sparse+" if sparse else "") + spec.to_string(),
            axis=cand.axis[1],
            sparsity=sparsity,
            dense_bytes=chain.dense_bytes,
            stored_bytes=stored,
        )

    # -- a palettized weight: its table quantized (the joint int8-table form) ------------------
    def _compress_table(self, cand: Candidate, ios18: bool, rewrites: Rewrites) -> WeightDecision:
        """Quantize a palettized weight's table (int8 or uint8, one scale per tensor or per
        table), the indices kept. iOS18 reads `constexpr_blockwise_shift_scale` of the table
        into `constexpr_lut_to_dense`; iOS26 the other way round, the int8 table palettizing
        int8 codes that a `constexpr_blockwise_shift_scale` of the weight's rank scales (the
        orders coremltools 9 writes for each target)."""
        root, spec, chain = cand.op, cand.spec, cand.chain
        reason = _table_reason(root, chain, spec, ios18)
        if reason is not None:
            return dense_decision(root, reason, cand)
        table = np.asarray(root.lut.val)  # [1.., groups.., 1.., 2^n, V]
        if spec.granularity == "per_tensor":
            scale_shape = [1] * table.ndim
        else:
            scale_shape = [*table.shape[:-2], 1, 1]
        try:
            q, scale, offset = quantize_blockwise(table, scale_shape, spec)
        except UnrepresentableScaleError as e:
            return dense_decision(root, f"{spec.to_string()}: {e}", cand)
        scale_bits = table.dtype.itemsize * 8
        tables = [(scale.size, scale_bits)] + ([] if offset is None else [(offset.size, 8)])
        indices = root.indices
        stored = formats.stored_bytes(
            [(int(np.prod(indices.shape)), bits_of(indices)), (q.size, 8), *tables]
        )
        # A table is a few entries: the int8 table is asked for its integer arithmetic, not its
        # bytes (about as many as before); it must only stay smaller than the dense weight.
        if stored >= chain.dense_bytes:
            return dense_decision(
                root, f"quantized form would not be smaller: {stored} >= {chain.dense_bytes} "
                "bytes", cand,
            )  # fmt: skip
        after_26 = self._opset is not None and self._opset >= _IOS26
        rewrites.replace(root, _table_builder(root, q, scale, offset, spec, after_26))
        return compressed_decision(
            cand,
            shape=chain.shape,
            dtype=chain.np_dtype,
            sparsity=chain.sparsity or 0.0,
            dense_bytes=chain.dense_bytes,
            stored_bytes=stored,
        )


def _table_reason(root, chain, spec: QuantizeSpec, ios18: bool) -> str | None:
    """Why a palettized weight's table cannot be quantized, or None."""
    if not ios18 or chain.ios16_form:
        return (
            f"already compressed: {chain.label}; quantizing its table needs iOS18 (set the "
            "target to ios18)"
        )
    if len(chain.ops) > 1 or root.op_type != "constexpr_lut_to_dense":
        return f"already compressed: {chain.label} (a chain of {len(chain.ops)} ops)"
    if spec.nbits != 8 or spec.granularity == "per_block":
        return (
            f"{spec.to_string()}: a table is quantized to int8 or uint8, per tensor (@t) or "
            "per table"
        )
    return None


def _table_builder(root, q, scale, offset, spec: QuantizeSpec, after_26: bool):
    name = root.name
    storage = _STORAGE[spec.dtype]
    indices = root.indices  # the same indices: the const is shared, not copied
    vector = {} if "vector_axis" not in root.inputs else {"vector_axis": root.vector_axis}
    rank = q.ndim - 2

    def build(site, tmp_name):
        codes = site.const(q.astype(storage), f"{name}_lut_quantized")
        if not after_26:
            extra = {} if offset is None else {
                "offset": site.const(offset.astype(storage), f"{name}_lut_offset")
            }  # fmt: skip
            table = mb.constexpr_blockwise_shift_scale(
                data=codes, scale=site.const(scale, f"{name}_lut_scale"),
                name=f"{name}_lut", before_op=site.op, **extra,
            )  # fmt: skip
            return mb.constexpr_lut_to_dense(
                indices=indices, lut=table, name=tmp_name, before_op=site.op, **vector
            )
        # iOS26: the int8 table palettizes int8 codes, scaled at the weight's rank
        weight_codes = mb.constexpr_lut_to_dense(
            indices=indices, lut=codes, name=f"{name}_palettized", before_op=site.op, **vector
        )
        shape = scale.shape[:rank]
        extra = {} if offset is None else {
            "offset": site.const(offset.reshape(shape).astype(storage), f"{name}_offset")
        }  # fmt: skip
        return mb.constexpr_blockwise_shift_scale(
            data=weight_codes, scale=site.const(scale.reshape(shape), f"{name}_scale"),
            name=tmp_name, before_op=site.op, **extra,
        )  # fmt: skip

    return build


def _zero_levels(q: np.ndarray, offset, scale_shape) -> int:
    """How many of `q` sit at their group's offset (decode to exactly 0)."""
    if offset is None:
        return int(q.size - np.count_nonzero(q))
    view = [x for d, n in enumerate(q.shape) for x in (scale_shape[d], n // scale_shape[d])]
    at = [x for d in range(q.ndim) for x in (scale_shape[d], 1)]
    return int(np.count_nonzero(q.reshape(view) == offset.reshape(at)))


def _scale_shape(shape, spec: QuantizeSpec, axes) -> list[int]:
    if spec.block_shape is not None:
        return [n // b if b else 1 for n, b in zip(shape, spec.block_shape, strict=True)]
    scale = [1] * len(shape)
    if spec.granularity != "per_tensor":
        scale[axes[1]] = shape[axes[1]]
    if spec.granularity == "per_block":
        scale[axes[0]] = shape[axes[0]] // spec.block_size
    return scale


def _builder(name, q, scale, offset, spec, mask, ios18, out_axis):
    storage = _STORAGE[spec.dtype]
    if mask is not None:

        def build_sparse(site, tmp_name):
            bits = site.const(mask.view(types.np_uint1_dtype), f"{name}_data_mask")
            data = site.const(q[mask != 0].astype(storage), f"{name}_nonzero_quantized")
            extra = {} if offset is None else {
                "offset": site.const(offset.astype(storage), f"{name}_offset")
            }  # fmt: skip
            sparse_mask, values = mb.constexpr_sparse_blockwise_shift_scale(
                data_mask=bits, nonzero_data=data,
                scale=site.const(scale, f"{name}_scale"),
                name=f"{name}_shift_scale", before_op=site.op, **extra,
            )  # fmt: skip
            return mb.constexpr_sparse_to_dense(
                nonzero_data=values, mask=sparse_mask, name=tmp_name, before_op=site.op
            )

        return build_sparse
    if ios18:

        def build(site, tmp_name):
            extra = {} if offset is None else {
                "offset": site.const(offset.astype(storage), f"{name}_offset")
            }  # fmt: skip
            return mb.constexpr_blockwise_shift_scale(
                data=site.const(q.astype(storage), f"{name}_data"),
                scale=site.const(scale, f"{name}_scale"),
                name=tmp_name, before_op=site.op, **extra,
            )  # fmt: skip

        return build
    per_channel = scale.size > 1
    zero_point = np.zeros(scale.shape, np.int64) if offset is None else offset

    def build16(site, tmp_name):
        return mb.constexpr_affine_dequantize(
            quantized_data=site.const(q.astype(storage), f"{name}_quantized_data"),
            zero_point=(zero_point.ravel() if per_channel else zero_point.ravel()[0]).astype(
                storage
            ),
            scale=scale.ravel() if per_channel else scale.ravel()[0],
            axis=out_axis if per_channel else 0,
            name=tmp_name,
            before_op=site.op,
        )

    return build16
