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

import dataclasses
from dataclasses import dataclass
from fnmatch import fnmatchcase

import numpy as np
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.converters.mil.mil.passes.pass_registry import register_pass
from milsparse.ir import formats, masks
from milsparse.ir.errors import ConfigError, UnsupportedModelError
from milsparse.ir.graph import Use, uses_of, walk_ops
from milsparse.passes._match import MatchResult
from milsparse.passes._rewrite import named_const, replace_const
from milsparse.passes.config import PruneConfig, PruneSpec, parse_prune_config
from milsparse.passes.decisions import WeightDecision
from tqdm.auto import tqdm

__all__ = ["PruneWeights", "WEIGHT_OPERANDS", "channel_axes"]

# Operands that hold a layer's weight; matmul's weight may be either side.
WEIGHT_OPERANDS = {
    "linear": ("weight",),
    "conv": ("weight",),
    "conv_transpose": ("weight",),
    "matmul": ("x", "y"),
}
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


def channel_axes(use: Use, rank: int) -> tuple[int, int]:
    """(input axis, output axis) of a weight read through `use`.

    The input axis is the one the consumer reduces over: 1 for linear [out, in] and conv
    [Cout, Cin/g, *k], 0 for conv_transpose [Cin, Cout/g, *k], K of matmul's operand.
    """
    if use.op_type == "conv_transpose":
        return 0, 1
    if use.op_type == "matmul":
        last, second = rank - 1, rank - 2
        if use.input_name == "y":
            transposed = bool(use.op.transpose_y.val)
            return (last, second) if transposed else (second, last)
        transposed = bool(use.op.transpose_x.val)
        return (second, last) if transposed else (last, second)
    return 1, 0


@dataclass(frozen=True)
class _Candidate:
    op: object
    uses: tuple[Use, ...]
    spec: PruneSpec
    axis: int | None
    note: str | None


def _consumers(uses) -> tuple[str, ...]:
    return tuple(f"{u.op.name}.{u.input_name}" for u in uses)


@register_pass(namespace="milsparse", name="prune")
class PruneWeights(AbstractGraphPass):
    """Prune weight consts into sparse constexpr ops (see the module docstring)."""

    def __init__(self, config: PruneConfig | str | dict | None = None):
        self._config = None if config is None else parse_prune_config(config)
        self.report: list[WeightDecision] = []
        self._encoded: dict[tuple, tuple] | None = None  # during apply, for multifunction

    @property
    def config(self) -> PruneConfig | None:
        return self._config

    @config.setter
    def config(self, value) -> None:
        # ct.PassPipeline.set_options hands over whatever the user gave: object, str or dict.
        self._config = parse_prune_config(value)

    def apply(self, prog) -> None:
        if self._config is None:
            raise ConfigError(
                "milsparse::prune has no config: pipeline.set_options('milsparse::prune', "
                "{'config': '2:4'}) or use milsparse.coreml_pipeline(config)"
            )
        # The functions of a multifunction package share weights: the loader gives them the
        # same array. Each is pruned once (one mask for every function) and reported once; the
        # writer stores the equal results once (`_io.share_identical_consts`).
        # Keys are ids of weight arrays; all of them are alive (held by their consts) from the
        # start of the pass, so no two share an id. Single-function programs keep no cache.
        multifunction = len(prog.functions) > 1
        self._encoded = {} if multifunction else None
        first_reader: dict[int, str] = {}
        for fname, func in prog.functions.items():
            ios18 = _check_opset(fname, func.opset_version)
            candidates, decisions, storage = [], [], {}
            for position, op in enumerate(walk_ops(func)):
                if op.op_type != "const":
                    continue
                match = self._match_structure(op)
                if match is None:
                    continue
                storage[position] = id(op.outputs[0].val)
                if match.matched:
                    candidates.append((position, match.value))
                else:
                    decisions.append((position, _dense_decision(op, match.reason)))
            progress = tqdm(
                candidates, desc="milsparse::prune", unit="weight", leave=False, disable=None
            )
            for position, cand in progress:
                decisions.append((position, self._prune_one(cand, ios18)))
            # Report in program order, whatever order the two phases produced the rows in.
            for position, decision in sorted(decisions, key=lambda item: item[0]):
                if multifunction:
                    shared = first_reader.setdefault(storage[position], fname)
                    decision = dataclasses.replace(
                        decision, function=fname, shared_with=None if shared == fname else shared
                    )
                self.report.append(decision)
        self._encoded = None

    def unused_overrides(self) -> list[str]:
        """Override patterns that matched no weight or consumer the pass looked at (a typo,
        or a name from another model): worth telling the user, never silently ignored."""
        names = set()
        for d in self.report:
            names.add(d.name)
            names.update(c.rsplit(".", 1)[0] for c in d.consumers)
        return [
            pattern
            for pattern, _ in (self._config.overrides if self._config else ())
            if not any(fnmatchcase(name, pattern) for name in names)
        ]

    # -- matching -------------------------------------------------------------------------
    def _match_structure(self, op) -> MatchResult[_Candidate] | None:
        """None for consts nobody would call weights (small or non-float and unselected)."""
        cfg = self._config
        var = op.outputs[0]
        val = var.val
        if not isinstance(val, np.ndarray):
            return None
        uses = uses_of(var)
        if not uses:
            return None
        named = bool(cfg.op_names) and cfg.names_selected(op.name)
        operand_uses = [u for u in uses if u.input_name in WEIGHT_OPERANDS.get(u.op_type, ())]
        typed_uses = [u for u in operand_uses if u.op_type in cfg.op_types]
        weight_uses = [u for u in typed_uses if cfg.names_selected(op.name, u.op.name)]
        is_float = val.dtype in _FLOAT_DTYPES
        if not (weight_uses or named or (is_float and val.size > formats.INLINE_MAX_ELEMENTS)):
            return None
        if any(u.op_type.startswith("constexpr_") for u in uses):
            return MatchResult.fail("already compressed: feeds a constexpr op")
        if not weight_uses and not named:
            if typed_uses:
                return MatchResult.fail("not selected: no op_names pattern matches it")
            if operand_uses:
                kinds = sorted({u.op_type for u in operand_uses})
                return MatchResult.fail(f"not selected: op_types excludes {', '.join(kinds)}")
            read_by = sorted({f"{u.op_type}.{u.input_name}" for u in uses})
            return MatchResult.fail(f"not a weight: read by {', '.join(read_by)}")
        if not is_float:
            return MatchResult.fail(f"not float: {val.dtype}")
        if val.ndim < 2:
            return MatchResult.fail(f"{val.ndim}-D")
        if val.size < cfg.min_size:
            return MatchResult.fail(f"small: {val.size} elements < min_size {cfg.min_size}")
        return self._resolve_spec(op, tuple(uses), tuple(weight_uses or uses), val.ndim)

    def _resolve_spec(self, op, all_uses, uses, rank) -> MatchResult[_Candidate]:
        """Pick the spec (and n:m / block axis) for a weight read through `uses`."""
        cfg = self._config
        found, spec, pattern = cfg.override_for(op.name)
        note = None
        chosen_use = uses[0]
        if found:
            if spec is None:
                return MatchResult.fail(f"left dense by override {pattern!r}")
        else:
            per_use = []
            for use in uses:
                hit, use_spec, use_pattern = cfg.override_for(use.op.name)
                if hit and use_spec is None:
                    return MatchResult.fail(
                        f"left dense by override {use_pattern!r} on consumer {use.op.name}"
                    )
                per_use.append((use_spec if hit else cfg.spec, use))
            spec, chosen_use = min(per_use, key=lambda item: item[0].nominal_sparsity)
            if len({s for s, _ in per_use}) > 1:
                note = (
                    f"shared by {len(uses)} ops with different specs; used {spec.to_string()} "
                    f"of {chosen_use.op.name} (least aggressive)"
                )
        axis = None
        input_axis, output_axis = channel_axes(chosen_use, rank)
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
        return MatchResult.ok(_Candidate(op, all_uses, spec, axis, note))

    def _match_values(self, cand: _Candidate, ios18: bool) -> MatchResult[np.ndarray]:
        weight = cand.op.outputs[0].val
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

    # -- rewriting --------------------------------------------------------------------------
    def _encode(self, cand: _Candidate, ios18: bool):
        """(encoded operands, None) or (None, reason); a weight array that another function
        shares is encoded once and its result reused."""
        weight = cand.op.outputs[0].val
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

    def _prune_one(self, cand: _Candidate, ios18: bool) -> WeightDecision:
        op = cand.op
        weight = op.outputs[0].val
        enc, reason = self._encode(cand, ios18)
        if enc is None:
            return _dense_decision(op, reason, cand)
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
            consumers=_consumers(cand.uses),
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


def _dense_decision(op, reason: str, cand: _Candidate | None = None) -> WeightDecision:
    val = op.outputs[0].val
    uses = cand.uses if cand else tuple(uses_of(op.outputs[0]))
    zeros = int(val.size - np.count_nonzero(val)) if val.size else 0
    size = formats.dense_bytes(val.size, val.dtype)
    return WeightDecision(
        name=op.name,
        consumers=_consumers(uses),
        shape=tuple(val.shape),
        dtype=str(val.dtype),
        compressed=False,
        reason=reason,
        spec=cand.spec.to_string() if cand else None,
        sparsity=zeros / val.size if val.size else 0.0,
        dense_bytes=size,
        stored_bytes=size,
        note=cand.note if cand else None,
    )


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
