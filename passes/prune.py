"""milsparse::prune: rewrite weight `const` ops into `constexpr_sparse_to_dense`.

Before (linear with a dense fp16 weight)::

    %w = const(val=<fp16 [512, 256]>)
    %y = linear(x=%x, weight=%w, bias=%b)

After, iOS18 target::

    %w_nonzero_data = const(val=<fp16 [65536]>)
    %w_mask = const(val=<uint1 [512, 256]>)
    %w = constexpr_sparse_to_dense(nonzero_data=%w_nonzero_data, mask=%w_mask)
    %y = linear(x=%x, weight=%w, bias=%b)

After, iOS16/iOS17 target: the mask is `uint8[ceil(N/8)]` (flattened, LSB first) and a
`shape=const(uint32 [2])` operand joins it.

The pass matches in two steps and touches the program only when both succeed: a structural
match over every const (is it a float weight of a selected op, big enough, not already
compressed?), then, one weight at a time, a value match (finite values, a mask that reaches the
minimum sparsity, a sparse form smaller than the dense one) followed at once by the rewrite, so
at most one weight's mask is alive. Every const it looked at gets a `WeightDecision` in
`self.report`, with the reason when it was left dense.

Shared weights (one const read by several selected ops) are pruned once. An override naming the
const itself decides; otherwise each consumer's spec is resolved, and if any consumer says
"dense" the weight stays dense, else the least aggressive spec (lowest nominal sparsity; ties
to the first consumer in program order) wins, and the report notes it.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.passes.pass_registry import register_pass
from milsparse.ir import formats, masks
from milsparse.ir.errors import UnsupportedModelError
from milsparse.ir.graph import Use
from milsparse.passes._match import MatchResult
from milsparse.passes._rewrite import named_const, replace_const
from milsparse.passes._weight_pass import (
    WEIGHT_OPERANDS,
    Candidate,
    WeightPass,
    channel_axes,
    consumers,
    dense_decision,
)
from milsparse.passes.config import PruneConfig, PruneSpec, parse_prune_config
from milsparse.passes.decisions import WeightDecision

__all__ = ["PruneWeights", "WEIGHT_OPERANDS", "channel_axes"]


@register_pass(namespace="milsparse", name="prune")
class PruneWeights(WeightPass):
    """Prune weight consts into sparse constexpr ops (see the module docstring)."""

    pass_name = "milsparse::prune"

    def __init__(self, config: PruneConfig | str | dict | None = None):
        super().__init__(config)
        self._encoded: dict[tuple, tuple] | None = None  # during apply, for multifunction

    @staticmethod
    def parse_config(value) -> PruneConfig:
        return parse_prune_config(value)

    def check_function(self, fname: str, opset) -> bool:
        """True for the iOS18 form; raises for opsets without constexpr_sparse_to_dense."""
        return _check_opset(fname, opset)

    def spec_key(self, spec: PruneSpec) -> float:
        return spec.nominal_sparsity

    def prepare(self, op, spec: PruneSpec, use: Use, rank: int) -> MatchResult:
        """The axis the pattern runs along; n:m on an axis shorter than m is refused."""
        input_axis, output_axis = channel_axes(use, rank)
        axis = None
        if spec.pattern in ("block", "n:m"):
            axis = input_axis if spec.resolved_axis == "input" else output_axis
        elif spec.pattern == "magnitude" and spec.scope == "channel":
            axis = output_axis
        shape = op.outputs[0].shape
        if spec.pattern == "n:m" and shape[axis] < spec.m:
            # round(n * r / m) zeros of r < m would be all of them for 2:4 on a length-1 axis
            # (a depthwise conv's input axis): that is not an n:m pattern, only a wiped weight.
            other = "output" if spec.resolved_axis == "input" else "input"
            return MatchResult.fail(
                f"{spec.to_string()}: its {spec.resolved_axis} axis ({axis}) has {shape[axis]} "
                f"< {spec.m} elements, no whole group (ask for the {other} axis with "
                f"@{'out' if other == 'output' else 'in'})"
            )
        return MatchResult.ok(axis)

    def _before(self, prog) -> None:
        # Functions of a multifunction package share weight arrays: each is encoded once and
        # its result reused. Keys are ids of weight arrays; all of them are alive (held by
        # their consts) from the start of the pass, so no two share an id. Single-function
        # programs keep no cache.
        self._encoded = {} if len(prog.functions) > 1 else None

    def _after(self, prog) -> None:
        self._encoded = None

    # -- values ------------------------------------------------------------------------------
    def _match_values(self, cand: Candidate, ios18: bool) -> MatchResult[np.ndarray]:
        weight = cand.weight
        if not masks.all_finite(weight):
            return MatchResult.fail("non-finite values (inf or nan)")
        keep = _build_mask(weight, cand.spec, cand.axis)
        masks.exclude_zeros(weight, keep)  # zeros are never stored, whatever the pattern kept
        nnz = int(np.count_nonzero(keep))
        sparsity = 1.0 - nnz / weight.size
        if cand.spec.pattern == "threshold" and sparsity < cand.spec.min_sparsity:
            return MatchResult.fail(
                f"below minimum sparsity: {sparsity:.4f} < {cand.spec.min_sparsity:g}"
            )
        dense = formats.dense_bytes(weight.size, weight.dtype)
        sparse = formats.sparse_bytes(weight.size, nnz, weight.dtype, ios18=ios18, rank=weight.ndim)
        if sparse >= dense:
            return MatchResult.fail(f"sparse form would be larger: {sparse} >= {dense} bytes")
        return MatchResult.ok(keep)

    def _encode(self, cand: Candidate, ios18: bool):
        """(encoded operands, None) or (None, reason)."""
        weight = cand.weight
        key = (id(weight), cand.spec, cand.axis, ios18)
        if self._encoded is not None and key in self._encoded:
            return self._encoded[key]
        match = self._match_values(cand, ios18)
        if not match.matched:
            result = (None, match.reason)
        else:
            encode = formats.encode_sparse_ios18 if ios18 else formats.encode_sparse_ios16
            result = (encode(weight, match.value, exact=True), None)
        if self._encoded is not None:
            self._encoded[key] = result
        return result

    # -- rewriting ---------------------------------------------------------------------------
    def compress(self, cand: Candidate, ios18: bool) -> WeightDecision:
        op = cand.op
        weight = cand.weight
        enc, reason = self._encode(cand, ios18)
        if enc is None:
            return dense_decision(op, reason, cand)
        nnz = enc.nonzero_data.size
        name = op.name
        if ios18:

            def build(anchor, tmp_name):
                nonzero = named_const(enc.nonzero_data, f"{name}_nonzero_data", anchor)
                mask = named_const(enc.mask.view(types.np_uint1_dtype), f"{name}_mask", anchor)
                return mb.constexpr_sparse_to_dense(
                    nonzero_data=nonzero, mask=mask, name=tmp_name, before_op=anchor
                )
        else:

            def build(anchor, tmp_name):
                nonzero = named_const(enc.nonzero_data, f"{name}_nonzero_data", anchor)
                mask = named_const(enc.mask, f"{name}_mask", anchor)
                shape = named_const(enc.shape, f"{name}_shape", anchor)
                return mb.constexpr_sparse_to_dense(
                    nonzero_data=nonzero, mask=mask, shape=shape, name=tmp_name, before_op=anchor
                )

        replace_const(op, build)
        return WeightDecision(
            name=name,
            consumers=consumers(cand.uses),
            shape=tuple(weight.shape),
            dtype=str(weight.dtype),
            compressed=True,
            spec=cand.spec.to_string(),
            axis=cand.axis,
            sparsity=1.0 - nnz / weight.size,
            dense_bytes=formats.dense_bytes(weight.size, weight.dtype),
            stored_bytes=formats.sparse_bytes(
                weight.size, nnz, weight.dtype, ios18=ios18, rank=weight.ndim
            ),
            note=cand.note,
        )


def _build_mask(weight: np.ndarray, spec: PruneSpec, axis: int | None) -> np.ndarray:
    if spec.pattern == "threshold":
        return masks.threshold_mask(weight, spec.threshold)
    if spec.pattern == "magnitude":
        return masks.magnitude_mask(weight, spec.sparsity, axis=axis)
    if spec.pattern == "block":
        return masks.block_mask(weight, spec.sparsity, spec.block_size, axis)
    return masks.nm_mask(weight, spec.n, spec.m, axis)


def _check_opset(fname: str, opset) -> bool:
    """True for the iOS18 form; raises for opsets without constexpr_sparse_to_dense."""
    if opset is None or opset < AvailableTarget.iOS16:
        have = "no opset" if opset is None else opset.name
        raise UnsupportedModelError(
            f"milsparse::prune: function {fname!r} targets {have}, but constexpr_sparse_to_dense "
            "needs iOS16 or later. Re-convert with ct.convert(..., minimum_deployment_target="
            "ct.target.iOS16) or newer, or pass target='ios16' to milsparse.compress "
            "(CLI: --target ios16)."
        )
    return opset >= AvailableTarget.iOS18
