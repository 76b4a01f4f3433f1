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

import attrs
import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from milsparse.ir import calibration, formats, masks
from milsparse.ir.chain import Form, bits_of
from milsparse.ir.cursor import Cursor
from milsparse.ir.errors import ConfigError
from milsparse.ir.graph import Use
from milsparse.ir.progress import bar as progress_bar
from milsparse.passes import catalog, data_aware
from milsparse.passes._match import MatchResult
from milsparse.passes._rewrite import Rewrites
from milsparse.passes._weight_pass import (
    WEIGHT_OPERANDS,
    Candidate,
    WeightPass,
    channel_axes,
    compressed_decision,
    dense_decision,
)
from milsparse.passes.decisions import WeightDecision
from milsparse.passes.prune_config import PruneConfig, PruneSpec, parse_prune_config
from milsparse.passes.registry import graph_pass

__all__ = ["PruneWeights", "WEIGHT_OPERANDS", "channel_axes"]


@graph_pass(catalog.PRUNE)
class PruneWeights(WeightPass):
    """Prune weight consts into sparse constexpr ops (see the module docstring)."""

    pass_name = "milsparse::prune"
    emits = "constexpr_sparse_to_dense"
    accepts = frozenset({Form.DENSE, Form.PALETTIZED, Form.QUANTIZED})

    def __init__(self, config: PruneConfig | str | dict | None = None, context=None):
        super().__init__(config, context)
        self._encoded: dict[tuple, tuple] | None = None  # during apply, for multifunction
        self._stats: dict = {}
        self._targets: dict = {}
        self.allocation: list = []  # the measured curves of allocate global / budget

    @staticmethod
    def parse_config(value) -> PruneConfig:
        return parse_prune_config(value)

    def spec_key(self, spec: PruneSpec) -> float:
        return spec.nominal_sparsity

    def prepare(self, op, spec: PruneSpec, use: Use, rank: int) -> MatchResult:
        """The axis the pattern runs along; n:m on an axis shorter than m, and a block longer
        than its axis, are refused (before any work: a block is never allocated)."""
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
        if spec.pattern == "block" and shape[axis] < spec.block_size:
            # coremltools skips a block longer than half the axis; one longer than the axis is
            # no block pattern at all (and block100000000000 is a typo, not a request)
            return MatchResult.fail(
                f"{spec.to_string()}: its {spec.resolved_axis} axis ({axis}) has {shape[axis]} "
                f"< {spec.block_size} elements, a block larger than the axis (use a block size "
                f"of at most {shape[axis]})"
            )
        return MatchResult.ok(axis)

    def _before(self, prog) -> None:
        # Functions of a multifunction package share weight arrays: each is encoded once and
        # its result reused. Keys are ids of weight arrays; all of them are alive (held by
        # their consts) from the start of the pass, so no two share an id. Single-function
        # programs keep no cache.
        self._encoded = {} if len(prog.functions) > 1 else None
        self._stats, self._targets = {}, {}
        self._cursor = None  # sequential calibration's position in the program
        self.allocation = []

    def _after(self, prog) -> None:
        self._encoded = None
        self._stats, self._targets, self._cursor = {}, {}, None

    def parallel_ok(self) -> bool:
        # sequential calibration runs each weight on the program as pruned before it
        return not self._config.is_sequential

    # -- calibration (criteria wanda, sparsegpt) -----------------------------------------------
    def _candidates_ready(self, function: str, candidates: list) -> list | None:
        cfg = self._config
        if (cfg.criterion == "magnitude" and cfg.allocate == "uniform") or not candidates:
            return None
        if not self.calibration:
            what = f"criterion {cfg.criterion}" if cfg.criterion != "magnitude" else "allocate"
            raise ConfigError(
                f"{what} needs calibration inputs: "
                "milsparse.compress(..., calibration=[{input: array}, ...] or 'data.npz') or "
                "--calibration FILE.npz"
            )
        self._function, self._cursor = function, None
        for cand in candidates:
            if cand.chain.form is not Form.DENSE and cfg.criterion == "sparsegpt":
                continue  # its values must stay as they are: reported in compress
            self._targets[cand.op.name] = calibration.targets_of(cand.op.name, cand.uses)
        allocating = cfg.allocate != "uniform"
        if not cfg.is_sequential or allocating:
            merged = {k: v for t in self._targets.values() if t for k, v in t.items()}
            self._stats = self._collect(
                merged, f"calibrating {len(candidates)} weights", with_xtx=allocating
            )
        if allocating:
            return self._allocate(candidates)
        return None

    def _allocate(self, candidates: list) -> list:
        """Per-layer sparsities from the measured curves (passes/allocate.py); weights whose
        spec an override set keep it."""
        from milsparse.passes import allocate

        cfg = self._config
        curves, chosen_for = [], {}
        for cand in candidates:
            stats = self._stats.get(cand.op.name)
            if cand.spec != cfg.spec or stats is None or cand.chain.form is not Form.DENSE:
                continue
            if not cand.finite():
                continue  # left as it is (the template's rule): no share of the budget
            weight = cand.weight
            axes = channel_axes(cand.uses[0], weight.ndim)
            curves.append(
                allocate.sensitivity(
                    cand.op.name, weight, cand.spec, cand.axis, stats, axes, cfg.criterion
                )
            )
        if curves:
            try:
                chosen_for = allocate.global_allocation(curves, cfg.spec.sparsity)
            except ValueError as e:
                raise ConfigError(f"allocate {cfg.allocate}: {e}") from e
        for curve in curves:
            curve.chosen = chosen_for[curve.name]
        self.allocation = curves
        revised = []
        for cand in candidates:
            if cand.op.name in chosen_for:
                spec = attrs.evolve(cand.spec, sparsity=chosen_for[cand.op.name])
                cand = dataclasses.replace(cand, spec=spec)
            revised.append(cand)
        return revised

    def _progress(self, what: str):
        """A bar (shown as the run context says) and the `progress(done, total)` that drives it."""
        bar = progress_bar(what, unit="step", show=self.context.progress)

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return bar, update

    def _with_xtx(self, allocating: bool = False) -> bool:
        return allocating or self._config.criterion == "sparsegpt"

    def _collect(self, targets: dict, what: str, with_xtx: bool = False) -> dict:
        bar, update = self._progress(what)
        with bar:
            return calibration.collect(
                self._program,
                self.calibration,
                targets,
                with_xtx=self._with_xtx(with_xtx),
                function=self._function,
                progress=update,
            )

    def _collect_sequential(self, cand: Candidate, targets: dict) -> dict:
        """Statistics of `cand`'s consumers on the program as pruned so far, from the run's
        cursor (one pass of the samples over the whole program, weight after weight; a
        weight whose consumer the cursor has passed restarts it from the inputs)."""
        consumers = [use.op for use in cand.uses]
        cursor = self._cursor
        if cursor is None or any(cursor.reached(op) for op in consumers):
            cursor = self._cursor = Cursor(self._program, self.calibration, self._function)
        bar, update = self._progress(f"calibrating {cand.op.name}")
        with bar:
            return calibration.collect_at(
                cursor, targets, consumers, with_xtx=self._with_xtx(), progress=update
            )

    def _stats_for(self, cand: Candidate):
        """(LayerStats, None) or (None, reason the criterion cannot apply)."""
        targets = self._targets.get(cand.op.name)
        if targets is None:
            kinds = sorted({u.op_type for u in cand.uses})
            return None, f"no calibration support for {', '.join(kinds)}"
        if self._config.is_sequential:
            found = self._collect_sequential(cand, targets)
        else:
            found = self._stats
        stats = found.get(cand.op.name)
        if stats is None or stats.rows == 0:
            return None, "its consumer did not run on the calibration inputs"
        return stats, None

    def _mask_and_values(self, cand: Candidate, weight: np.ndarray):
        """(keep, values to store, note) under the config's criterion, or (None, None,
        reason)."""
        criterion = self._config.criterion
        if criterion == "magnitude":
            return _build_mask(weight, cand.spec, cand.axis), weight, None
        stats, reason = self._stats_for(cand)
        if stats is None:
            return None, None, f"{criterion}: {reason}"
        axes = channel_axes(cand.uses[0], weight.ndim)
        note = f"{criterion}, {stats.samples} samples"
        if criterion == "wanda":
            return data_aware.wanda_mask(weight, cand.spec, cand.axis, stats, axes), weight, note
        keep, values, warning = data_aware.sparsegpt(
            weight, cand.spec, cand.axis, stats, axes, self._config.dampening
        )
        return keep, values, note if warning is None else f"{note}; {warning}"

    # -- values ------------------------------------------------------------------------------
    def _match_values(self, cand: Candidate, ios18: bool) -> MatchResult:
        """(encoded operands, note) of a dense weight, or the reason it stays dense."""
        keep, weight, note = self._mask_and_values(cand, cand.weight)
        if keep is None:
            return MatchResult.fail(note)
        # zeros are never stored, whatever the pattern kept (the encoder drops them)
        encode = formats.encode_sparse_ios18 if ios18 else formats.encode_sparse_ios16
        enc = encode(weight, keep)
        del keep
        nnz = int(enc.nonzero_data.size)
        sparsity = 1.0 - nnz / weight.size
        if cand.spec.pattern == "threshold" and sparsity < cand.spec.min_sparsity:
            return MatchResult.fail(
                f"below minimum sparsity: {sparsity:.4f} < {cand.spec.min_sparsity:g}"
            )
        dense = formats.dense_bytes(weight.size, weight.dtype)
        sparse = formats.sparse_bytes(weight.size, nnz, weight.dtype, ios18=ios18, rank=weight.ndim)
        if sparse >= dense:
            return MatchResult.fail(f"sparse form would be larger: {sparse} >= {dense} bytes")
        return MatchResult.ok((enc, note))

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
            result = (match.value, None)
        if self._encoded is not None:
            self._encoded[key] = result
        return result

    # -- rewriting ---------------------------------------------------------------------------
    def compress(self, cand: Candidate, ios18: bool, rewrites: Rewrites) -> WeightDecision:
        if cand.chain.form is not Form.DENSE:
            return self._compress_compressed(cand, ios18, rewrites)
        op = cand.op
        weight = cand.weight
        encoded, reason = self._encode(cand, ios18)
        if encoded is None:
            return dense_decision(op, reason, cand)
        enc, criterion_note = encoded
        note = "; ".join(n for n in (cand.note, criterion_note) if n) or None
        nnz = enc.nonzero_data.size
        name = op.name
        if ios18:

            def build(site, tmp_name):
                nonzero = site.const(enc.nonzero_data, f"{name}_nonzero_data")
                mask = site.const(enc.mask.view(types.np_uint1_dtype), f"{name}_mask")
                return mb.constexpr_sparse_to_dense(
                    nonzero_data=nonzero, mask=mask, name=tmp_name, before_op=site.op
                )
        else:

            def build(site, tmp_name):
                nonzero = site.const(enc.nonzero_data, f"{name}_nonzero_data")
                mask = site.const(enc.mask, f"{name}_mask")
                shape = site.const(enc.shape, f"{name}_shape")
                return mb.constexpr_sparse_to_dense(
                    nonzero_data=nonzero, mask=mask, shape=shape, name=tmp_name, before_op=site.op
                )

        rewrites.replace(op, build)
        return compressed_decision(
            cand,
            shape=weight.shape,
            dtype=weight.dtype,
            sparsity=1.0 - nnz / weight.size,
            dense_bytes=formats.dense_bytes(weight.size, weight.dtype),
            stored_bytes=formats.sparse_bytes(
                weight.size, nnz, weight.dtype, ios18=ios18, rank=weight.ndim
            ),
            note=note,
        )

    # -- a palettized or quantized weight: the joint forms, nothing refitted -------------------
    def _compress_compressed(
        self, cand: Candidate, ios18: bool, rewrites: Rewrites
    ) -> WeightDecision:
        """Prune a palettized (`constexpr_lut_to_dense`) or quantized
        (`constexpr_blockwise_shift_scale`) weight into the joint iOS18 form. The pattern is
        chosen on the decoded weight; the kept positions keep their own indices or quantized
        values, so they decode bit-identically to what the weight decoded to before."""
        root, chain, spec = cand.op, cand.chain, cand.spec
        reason = _joint_reason(root, chain, ios18)
        if reason is not None:
            return dense_decision(root, reason, cand)
        decoded = chain.decode()
        if self._config.criterion == "sparsegpt":
            return dense_decision(
                root, f"sparsegpt changes the kept values; a {chain.label} weight keeps its "
                "own (use criterion wanda or magnitude)", cand,
            )  # fmt: skip
        keep, _, reason = self._mask_and_values(cand, decoded)
        if keep is None:
            return dense_decision(root, reason, cand)
        masks.exclude_zeros(decoded, keep)
        nnz = int(np.count_nonzero(keep))
        if spec.pattern == "threshold" and 1.0 - nnz / keep.size < spec.min_sparsity:
            return dense_decision(
                root, f"below minimum sparsity: {1 - nnz / keep.size:.4f} < "
                f"{spec.min_sparsity:g}", cand,
            )  # fmt: skip
        if root.op_type == "constexpr_lut_to_dense":
            codes, tables = np.asarray(root.indices.val), [("lut", root.lut)]
        else:
            codes = np.asarray(root.data.val)
            tables = [(n, root.inputs[n]) for n in ("scale", "offset") if n in root.inputs]
        value_bits = chain.nbits
        table_bytes = [(int(np.prod(v.shape)), bits_of(v)) for _, v in tables]
        stored = formats.stored_bytes([(keep.size, 1), (nnz, value_bits), *table_bytes])
        if stored >= chain.stored_bytes:
            return dense_decision(
                root, f"joint form would not be smaller: {stored} >= {chain.stored_bytes} bytes",
                cand,
            )  # fmt: skip
        kept_codes = codes[keep]  # row-major, as the mask reads them
        rewrites.replace(root, _joint_builder(root, keep, kept_codes, tables))
        return compressed_decision(
            cand,
            shape=chain.shape,
            dtype=decoded.dtype if chain.dtype != "fp16" else np.dtype(np.float16),
            sparsity=1.0 - nnz / keep.size,
            dense_bytes=chain.dense_bytes,
            stored_bytes=stored,
        )


def _joint_reason(root, chain, ios18: bool) -> str | None:
    """Why a compressed weight cannot be pruned into a joint form, or None."""
    if not ios18 or chain.ios16_form:
        return (
            f"already compressed: {chain.label}; joint forms need iOS18 (set the target to ios18)"
        )
    if root.op_type not in ("constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"):
        return f"already compressed: {chain.label} ({root.op_type} has no joint form)"
    if chain.vector_size > 1:
        return f"already compressed: {chain.label}; vector-palettized weights are not pruned"
    if len(chain.ops) > 1:
        return f"already compressed: {chain.label} (a chain of {len(chain.ops)} ops)"
    return None


def _joint_builder(root, keep, kept_codes, tables):
    name = root.name
    mask_value = keep.astype(np.uint8).view(types.np_uint1_dtype)
    table_values = [(n, np.asarray(v.val)) for n, v in tables]

    def build(site, tmp_name):
        mask = site.const(mask_value, f"{name}_data_mask")
        codes = site.const(kept_codes, f"{name}_nonzero_codes")
        consts = {n: site.const(v, f"{name}_{n}_kept") for n, v in table_values}
        if root.op_type == "constexpr_lut_to_dense":
            sparse_mask, values = mb.constexpr_lut_to_sparse(
                indices_mask=mask, indices_nonzero_data=codes, lut=consts["lut"],
                name=f"{name}_lut_to_sparse", before_op=site.op,
            )  # fmt: skip
        else:
            sparse_mask, values = mb.constexpr_sparse_blockwise_shift_scale(
                data_mask=mask, nonzero_data=codes, name=f"{name}_shift_scale",
                before_op=site.op, **consts,
            )  # fmt: skip
        return mb.constexpr_sparse_to_dense(
            nonzero_data=values, mask=sparse_mask, name=tmp_name, before_op=site.op
        )

    return build


def _build_mask(weight: np.ndarray, spec: PruneSpec, axis: int | None) -> np.ndarray:
    if spec.pattern == "threshold":
        return masks.threshold_mask(weight, spec.threshold)
    if spec.pattern == "magnitude":
        return masks.magnitude_mask(weight, spec.sparsity, axis=axis)
    if spec.pattern == "block":
        return masks.block_mask(weight, spec.sparsity, spec.block_size, axis)
    return masks.nm_mask(weight, spec.n, spec.m, axis)
