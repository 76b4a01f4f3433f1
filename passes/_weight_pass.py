"""The weight-pass template: the walk and selection every compression pass shares.

select -> resolve the spec -> (the pass) match values and emit -> decision

A `WeightPass` walks every function (nested blocks included), and for each float `const` it
looks at decides, in one place for every pass:

- selection: the consumer op types and operands that hold weights (`WEIGHT_OPERANDS`), the
  config's `op_types`, `op_names` (fnmatch patterns of weight or consumer names), `min_size`,
  rank >= 2; a failed selection is a `MatchResult` reason for the report;
- the spec, from per-name overrides (the weight's own name first, then each consumer's), and
  for a weight shared by several ops the least aggressive of their specs (`spec_key`);
- shared weights of multifunction programs (the loader gives the functions the same array):
  reported once, with the other functions' rows marked `shared_with`;
- progress over the candidates, and the report in program order;
- a weight holding inf or nan (`Candidate.finite`) is left as it is, whatever the pass.

A subclass gives its config parser (`parse_config`), the op it emits (`emits`, for the error
of a function below iOS16; `check_function` tells `compress` if iOS18 forms are allowed), the
order of its specs (`spec_key`), an optional last structural check with the axis it works
along (`prepare`), and `compress`, which matches one weight's values and records its
replacement in the `Rewrites` it is given (it may run in a worker thread: it builds no MIL;
the walk applies the records in program order), returning the decision. Its config must offer
`spec`, `op_types`, `op_names`, `overrides`, `min_size` and `override_for` /
`names_selected` (`passes.config.SelectionMethods` gives them all).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from milsparse.ir import formats, masks
from milsparse.ir.chain import QUANT_OPS, Form, WeightChain, weight_chain
from milsparse.ir.errors import ConfigError, UnsupportedModelError
from milsparse.ir.graph import Use, uses_of, walk_ops
from milsparse.ir.progress import bar as progress_bar
from milsparse.passes._match import MatchResult
from milsparse.passes._rewrite import Rewrites
from milsparse.passes.decisions import NOT_A_WEIGHT, WeightDecision
from milsparse.passes.run_context import RunContext, sink_for

__all__ = [
    "WEIGHT_OPERANDS",
    "Candidate",
    "WeightPass",
    "channel_axes",
    "compressed_decision",
    "dense_decision",
]

# Operands that hold a layer's weight; matmul's weight may be either side.
WEIGHT_OPERANDS = {
    "linear": ("weight",),
    "conv": ("weight",),
    "conv_transpose": ("weight",),
    "matmul": ("x", "y"),
}
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_FLOAT_TYPES = (types.fp16, types.fp32)


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
class Candidate:
    """A weight selected for compression: its const (or the root of its constexpr chain),
    every use, the resolved spec, the axis the pass works along (if any), a note for the
    report, and what the weight is now."""

    op: Any
    uses: tuple[Use, ...]
    spec: Any
    axis: int | None
    note: str | None
    chain: WeightChain

    @property
    def weight(self) -> np.ndarray:
        """The dense weight's values (a const's own array)."""
        return self.op.outputs[0].val

    def finite(self) -> bool:
        """Whether the weight's values are all finite: a const's array; a chain's stored float
        values (nonzero values, tables, scales, offsets) and, where a scale multiplies (its
        fp16 product can overflow), the decoded weight."""
        if self.chain.form is Form.DENSE:
            return masks.all_finite(self.weight)
        stored = all(
            masks.all_finite(var.val)
            for op in self.chain.ops
            for var in op.inputs.values()
            if var.op is not None and var.op.op_type == "const" and var.dtype in _FLOAT_TYPES
        )
        if not stored or not any(op.op_type in QUANT_OPS for op in self.chain.ops):
            return stored
        return masks.all_finite(self.chain.decode())


def consumers(uses) -> tuple[str, ...]:
    return tuple(f"{u.op.name}.{u.input_name}" for u in uses)


def compressed_decision(
    cand: Candidate,
    *,
    shape,
    dtype,
    sparsity: float,
    dense_bytes: int,
    stored_bytes: int,
    name: str | None = None,
    spec: str | None = None,
    axis: int | None = None,
    note: str | None = None,
) -> WeightDecision:
    """The report row of a weight the pass rewrote: named after its op (or `name`), with the
    candidate's consumers, spec text (or `spec`), axis (or `axis`) and note (or `note`)."""
    return WeightDecision(
        name=cand.op.name if name is None else name,
        consumers=consumers(cand.uses),
        shape=tuple(shape),
        dtype=str(dtype),
        compressed=True,
        spec=cand.spec.to_string() if spec is None else spec,
        axis=cand.axis if axis is None else axis,
        sparsity=float(sparsity or 0.0),
        dense_bytes=int(dense_bytes),
        stored_bytes=int(stored_bytes),
        note=cand.note if note is None else note,
    )


def dense_decision(op, reason: str, cand: Candidate | None = None) -> WeightDecision:
    """The report row of a weight left as it is (a const, or a chain root). With `cand` (in a
    worker thread) it reads nothing of the program but the candidate."""
    if cand is not None and cand.chain.form is not Form.DENSE:
        chain, uses = cand.chain, cand.uses
    else:
        chain = weight_chain(op) if op.op_type != "const" else None
        uses = uses_of(chain.var) if chain is not None else None
    if chain is not None:
        return WeightDecision(
            name=op.name,
            consumers=consumers(uses),
            shape=chain.shape,
            dtype=str(chain.np_dtype),
            compressed=False,
            reason=reason,
            spec=cand.spec.to_string() if cand else None,
            sparsity=chain.sparsity or 0.0,
            dense_bytes=chain.dense_bytes,
            stored_bytes=chain.stored_bytes,
            note=cand.note if cand else None,
        )
    val = op.outputs[0].val
    uses = cand.uses if cand else tuple(uses_of(op.outputs[0]))
    zeros = int(val.size - np.count_nonzero(val)) if val.size else 0
    size = formats.dense_bytes(val.size, val.dtype)
    return WeightDecision(
        name=op.name,
        consumers=consumers(uses),
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


NON_FINITE = "non-finite values (inf or nan)"  # the reason such a weight stays dense

# Dense bytes of the weights a parallel run has in flight at most (one larger weight goes alone).
IN_FLIGHT_BYTES = 512 << 20


class WeightPass(AbstractGraphPass):
    """The template (see the module docstring). Subclasses set `pass_name` and the weight
    forms they take (`accepts`; others are reported as already compressed)."""

    pass_name = "milsparse::?"
    accepts: frozenset = frozenset({Form.DENSE})

    def __init__(self, config=None, context: RunContext | None = None):
        self._config = None if config is None else self.parse_config(config)
        self.context = context or RunContext()
        self.report: list[WeightDecision] = []
        # pipeline options inside ct.convert (coremltools sets them as attributes): the
        # ReportSink key of `coreml_pipeline`, and worker threads; None: the context's
        self.run: str | None = None
        self.jobs: int | None = None
        self._program = None
        self._energy: dict = {}

    @property
    def calibration(self) -> list[dict] | None:
        """The run's calibration samples (checked input dicts), or None."""
        return self.context.calibration

    # -- parallel compression ----------------------------------------------------------------

    def parallel_ok(self) -> bool:
        """Whether weights are independent for this run (sequential calibration makes each
        depend on the ones before)."""
        return True

    def _compress_in_parallel(self, pending, context, jobs, decisions, progress) -> None:
        """`compress` of the candidates in `pending` (last = next) in `jobs` threads, at most
        2 x jobs in flight. Workers record their rewrites (`Rewrites`); this thread applies
        them in program order, so the program and its bytes are those of a serial run."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        def work(cand):
            rewrites = Rewrites()
            return self._compress_finite(cand, context, rewrites), rewrites

        window: deque = deque()
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="milsparse") as pool:
            try:
                while pending or window:
                    # at most 2 x jobs weights in flight, and no more than IN_FLIGHT_BYTES of
                    # them (dense size) unless one alone is larger: a huge embedding goes alone
                    while pending and len(window) < 2 * jobs:
                        size = pending[-1][1].chain.dense_bytes
                        if window and sum(w[2] for w in window) + size > IN_FLIGHT_BYTES:
                            break
                        position, cand = pending.pop()
                        window.append((position, pool.submit(work, cand), size))
                        del cand
                    position, future, _ = window.popleft()
                    decision, rewrites = future.result()
                    rewrites.apply(self.context.spill)
                    decisions.append((position, decision))
                    progress.update(1)
            finally:
                for _, future, _ in window:
                    future.cancel()

    # -- what a subclass gives ---------------------------------------------------------------
    @staticmethod
    def parse_config(value):
        raise NotImplementedError

    emits = "its ops"  # what the pass writes, for the message of `check_function`

    def check_function(self, fname: str, opset) -> bool:
        """Raise for a function below iOS16 (no constexpr ops); return whether it takes the
        iOS18 forms, what `compress` needs to know of the function."""
        if opset is None or opset < AvailableTarget.iOS16:
            have = "no opset" if opset is None else opset.name
            raise UnsupportedModelError(
                f"{self.pass_name}: function {fname!r} targets {have}, but {self.emits} "
                "needs iOS16 or later. Re-convert with ct.convert(..., minimum_deployment_target="
                "ct.target.iOS16) or newer, or pass target='ios16' to milsparse.compress "
                "(CLI: --target ios16)."
            )
        return opset >= AvailableTarget.iOS18

    def spec_key(self, spec) -> float:
        """Orders specs from least to most aggressive (a shared weight takes the least)."""
        raise NotImplementedError

    def prepare(self, op, spec, use: Use, rank: int) -> MatchResult:
        """A last structural check of `spec` on the weight read through `use`; its value is
        the axis the pass works along (None if it has none)."""
        return MatchResult.ok(None)

    def _compress_finite(self, cand: Candidate, ios18: bool, rewrites: Rewrites):
        """`compress`, for a weight whose values are finite: one rule for every pass, a weight
        holding inf or nan stays dense (no pattern, table or scale can be fitted to it)."""
        if not cand.finite():
            return dense_decision(cand.op, NON_FINITE, cand)
        return self.compress(cand, ios18, rewrites)

    def compress(self, cand: Candidate, ios18: bool, rewrites: Rewrites) -> WeightDecision:
        """Match the weight's values, record its replacement in `rewrites`, return the
        decision. `ios18`: whether the function takes the iOS18 forms (`check_function`).

        It may run in a worker thread, beside other weights' calls: it builds no MIL (the
        walk applies `rewrites` on the calling thread, in program order), writes nothing to
        `self` that a concurrent call reads (a multifunction walk, serial, may share a cache),
        and reads the program only through `cand`."""
        raise NotImplementedError

    # -- the config, as ct.PassPipeline.set_options hands it over -------------------------------
    @property
    def config(self):
        return self._config

    @config.setter
    def config(self, value) -> None:
        self._config = self.parse_config(value)

    # -- the walk ----------------------------------------------------------------------------
    def apply(self, prog) -> None:
        if self._config is None:
            raise ConfigError(
                f"{self.pass_name} has no config: pipeline.set_options('{self.pass_name}', "
                "{'config': ...}) or use milsparse.coreml_pipeline(recipe)"
            )
        self._program = prog
        self._energy = {}
        self._before(prog)
        self.report = []
        multifunction = len(prog.functions) > 1
        first_reader: dict[int, str] = {}
        for fname, func in prog.functions.items():
            context = self.check_function(fname, func.opset_version)
            candidates, decisions, storage = [], [], {}
            for position, op in enumerate(walk_ops(func)):
                if op.op_type != "const" and not op.op_type.startswith("constexpr_"):
                    continue
                match = self._match_structure(op)
                if match is None:
                    continue
                storage[position] = _storage_key(op)
                if match.matched:
                    candidates.append((position, match.value))
                else:
                    decisions.append((position, dense_decision(op, match.reason)))
            chosen = self._candidates_ready(fname, [cand for _, cand in candidates])
            if chosen is not None:  # the pass revised the candidates (their specs)
                candidates = [(p, c) for (p, _), c in zip(candidates, chosen, strict=True)]
            del chosen
            # Each candidate is let go once compressed: its weight (a mapped view of the source
            # file) is released with the const it replaced, and its pages leave memory.
            pending = candidates[::-1]
            del candidates
            jobs = self.jobs or self.context.jobs
            jobs = jobs if not multifunction and self.parallel_ok() else 1
            with progress_bar(
                self.pass_name, total=len(pending), unit="weight", show=self.context.progress
            ) as progress:
                if jobs > 1 and len(pending) > 1:
                    self._compress_in_parallel(pending, context, jobs, decisions, progress)
                while pending:
                    position, cand = pending.pop()
                    rewrites = Rewrites()
                    decisions.append((position, self._compress_finite(cand, context, rewrites)))
                    rewrites.apply(self.context.spill)
                    del cand
                    progress.update(1)
            # Report in program order, whatever order the two phases produced the rows in.
            for position, decision in sorted(decisions, key=lambda item: item[0]):
                if multifunction:
                    # the loader gives functions that share a weight the same array
                    shared = first_reader.setdefault(storage[position], fname)
                    decision = dataclasses.replace(
                        decision, function=fname, shared_with=None if shared == fname else shared
                    )
                self.report.append(decision)
        self._after(prog)
        self._program, self._energy = None, {}  # the run's program and statistics
        sink = self.context.sink or sink_for(self.run)
        if sink is not None:
            sink.put(self.pass_name, self.report, self.unused_overrides())

    def _before(self, prog) -> None:
        """Set up per-run state (subclasses); the pass instance may be reused."""

    def _candidates_ready(self, function: str, candidates: list) -> list | None:
        """Called once per function with its selected weights, in program order, before any
        is compressed (data-aware pruning collects its statistics here); may return the
        candidates revised (per-layer specs of an allocation), in the same order. By default,
        with calibration samples, it collects each weight's input-column energy."""
        if self.calibration and candidates:
            self._energy = collect_energy(self._program, function, self.calibration, candidates)
        return None

    def importance(self, cand: Candidate, shape) -> np.ndarray | None:
        """Per element of the weight (its dense layout), the activation energy of the input
        column it multiplies (`sum x_j^2` over the calibration rows), or None without
        calibration (or for consumers without calibration support)."""
        stats = self._energy.get(cand.op.name)
        if stats is None:
            return None
        axes = channel_axes(cand.uses[0], len(shape))
        per_column = stats.sq / max(stats.rows, 1)
        return np.broadcast_to(stats.expand(per_column, tuple(shape), axes), shape)

    def _after(self, prog) -> None:
        """Drop per-run state (subclasses)."""

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

    # -- selection -----------------------------------------------------------------------------
    def _match_structure(self, op) -> MatchResult[Candidate] | None:
        """None for consts nobody would call weights (small or non-float and unselected) and
        for the consts and ops inside a constexpr chain (its root speaks for the weight)."""
        cfg = self._config
        chain = weight_chain(op)
        if op.op_type != "const":
            if chain is None:
                return None
            var, val = chain.var, _Shape(chain)
        else:
            var = op.outputs[0]
            val = var.val
            if not isinstance(val, np.ndarray):
                return None
        uses = uses_of(var)
        if not uses or any(u.op_type.startswith("constexpr_") for u in uses):
            return None
        named = bool(cfg.op_names) and cfg.names_selected(op.name)
        operand_uses = [u for u in uses if u.input_name in WEIGHT_OPERANDS.get(u.op_type, ())]
        typed_uses = [u for u in operand_uses if u.op_type in cfg.op_types]
        weight_uses = [u for u in typed_uses if cfg.names_selected(op.name, u.op.name)]
        is_float = val.dtype in _FLOAT_DTYPES
        if not (weight_uses or named or (is_float and val.size > formats.INLINE_MAX_ELEMENTS)):
            return None
        if chain is not None and chain.form not in self.accepts:
            return MatchResult.fail(f"already compressed: {chain.label}")
        if chain is not None and chain.ios16_form and chain.form is not Form.DENSE:
            return MatchResult.fail(
                f"already compressed: {chain.label}; joint forms need the iOS18 operands "
                "(compress with target ios18 first)"
            )
        if not weight_uses and not named:
            if typed_uses:
                return MatchResult.fail("not selected: no op_names pattern matches it")
            if operand_uses:
                kinds = sorted({u.op_type for u in operand_uses})
                return MatchResult.fail(f"not selected: op_types excludes {', '.join(kinds)}")
            read_by = sorted({f"{u.op_type}.{u.input_name}" for u in uses})
            return MatchResult.fail(f"{NOT_A_WEIGHT}: read by {', '.join(read_by)}")
        if not is_float:
            return MatchResult.fail(f"not float: {val.dtype}")
        if val.ndim < 2:
            return MatchResult.fail(f"{val.ndim}-D")
        if val.size < cfg.min_size:
            return MatchResult.fail(f"small: {val.size} elements < min_size {cfg.min_size}")
        if chain is None:
            # (min_size 0) coremltools stores such a const inline in the program, where no
            # compressed form is smaller, and no weight chain describes it
            return MatchResult.fail(
                f"too small to compress: {val.size} elements (consts of at most "
                f"{formats.INLINE_MAX_ELEMENTS} are stored inline)"
            )
        return self._resolve_spec(op, tuple(uses), tuple(weight_uses or uses), val.ndim)

    def _resolve_spec(self, op, all_uses, uses, rank) -> MatchResult[Candidate]:
        """Pick the spec for a weight read through `uses`: an override naming the const, else
        each consumer's (an override on it, or the default), the least aggressive winning."""
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
            spec, chosen_use = min(per_use, key=lambda item: self.spec_key(item[0]))
            if len({s for s, _ in per_use}) > 1:
                note = (
                    f"shared by {len(uses)} ops with different specs; used {spec.to_string()} "
                    f"of {chosen_use.op.name} (least aggressive)"
                )
        prepared = self.prepare(op, spec, chosen_use, rank)
        if not prepared.matched:
            return prepared
        chain = weight_chain(op)
        return MatchResult.ok(Candidate(op, all_uses, spec, prepared.value, note, chain))


class _Shape:
    """What selection reads of a weight (dtype, size, ndim), for a chain root."""

    def __init__(self, chain: WeightChain):
        self.dtype = chain.np_dtype
        self.size = chain.num_elements
        self.ndim = len(chain.shape)


def _storage_key(op):
    """What identifies a weight's storage across the functions of a multifunction program:
    the arrays of its const (or of the consts of its chain), which the loader shares."""
    if op.op_type == "const":
        return id(op.outputs[0].val)
    chain = weight_chain(op)
    return tuple(
        id(var.val)
        for o in chain.ops
        for var in o.inputs.values()
        if var.op is not None and var.op.op_type == "const"
    )


def collect_energy(prog, function: str, samples: list, candidates: list) -> dict:
    """{weight name: LayerStats (sums of squares only)} of the candidates whose every
    consumer has calibration support, from one run of the samples."""
    from milsparse.ir import calibration

    targets = {}
    for cand in candidates:
        targets.update(calibration.targets_of(cand.op.name, cand.uses) or {})
    if not targets:
        return {}
    return calibration.collect(prog, samples, targets, with_xtx=False, function=function)
