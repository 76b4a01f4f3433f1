"""Check a compressed model against its reference on any OS, through the numpy interpreter.

`verify(reference, candidate)` runs both programs on the same inputs (given, or generated from
the model's input description) and reports, per output, how far the candidate moved (max and
mean absolute error, relative L2 error, SNR and PSNR in dB, cosine similarity; for integer and
bool outputs, which are labels or indices rather than measurements, the match rate of exact
comparison) and, per pruned weight, the sparsity reached and whether its block or n:m pattern
holds. The verdict compares the metrics with `Tolerances`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from milsparse import package
from milsparse.errors import ConfigError, UnsupportedModelError
from milsparse.ir import masks
from milsparse.ir.graph import walk_ops
from milsparse.ir.interpreter import evaluate_program, run_samples, static_values
from milsparse.ir.samples import check_input_value, name_problem, read_npz
from milsparse.ir.weights import weight_table
from milsparse.report import format_table

__all__ = ["Tolerances", "OutputMetrics", "WeightCheck", "VerifyReport", "verify", "evaluate"]

PRUNE_METADATA_KEY = "com.github.milsparse.pruned"


@dataclass(frozen=True)
class Tolerances:
    """The verdict: every output must reach all of these (None disables a check).

    Defaults: SNR >= 15 dB (the error carries at most about 3% of the output's energy) and
    cosine similarity >= 0.98, per output over all samples. Tighten them for models whose outputs
    must barely move; compressions that damage a model land far below either.

    Integer and bool outputs (an argmax, a top-k index, a mask) are compared exactly instead:
    `max_mismatch` is the fraction of their values allowed to differ (default 0). The float
    metrics would pass an argmax that moved from 8 to 9 on every sample (SNR 18 dB, cosine 1).
    """

    min_snr_db: float | None = 15.0
    min_cosine: float | None = 0.98
    max_rel_l2: float | None = None
    max_abs: float | None = None
    max_mismatch: float | None = 0.0

    def __post_init__(self):
        # NaN compares false with everything, so a NaN bound would switch its check off.
        for name, low, high in (
            ("min_snr_db", -math.inf, math.inf),
            ("min_cosine", -1.0, 1.0),
            ("max_rel_l2", 0.0, math.inf),
            ("max_abs", 0.0, math.inf),
            ("max_mismatch", 0.0, 1.0),
        ):  # bounds are finite: an infinite one would also switch its check off
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number or None, got {value!r}")
            if not (math.isfinite(value) and low <= value <= high):
                where = f"in [{low:g}, {high:g}]" if math.isfinite(low + high) else "finite"
                where += " and >= 0" if low == 0 else ""
                raise ConfigError(f"{name} must be a number {where}, got {value!r}")


@dataclass
class OutputMetrics:
    """How far one output moved over all samples. For an `exact` (integer or bool) output the
    float metrics that treat it as a signal (rel_l2, SNR, PSNR, cosine) are None, and
    `mismatches` / `match_rate` count the values that differ; for a float output those two
    are None."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    rel_l2: float | None
    snr_db: float | None
    psnr_db: float | None
    cosine: float | None
    failures: list[str] = field(default_factory=list)
    exact: bool = False
    mismatches: int | None = None
    match_rate: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class WeightCheck:
    name: str
    format: str  # the weight chain's label (sparse, sparse+lut4, ...)
    sparsity: float
    pattern: str | None = None
    pattern_holds: bool | None = None
    detail: str | None = None
    sparse: bool = False  # the weight is stored with a mask


@dataclass
class VerifyReport:
    outputs: list[OutputMetrics]
    weights: list[WeightCheck]
    tolerances: Tolerances
    samples: int

    @property
    def failures(self) -> list[str]:
        found = [f"output {o.name}: {f}" for o in self.outputs for f in o.failures]
        found += [
            f"weight {w.name}: {w.pattern} pattern broken ({w.detail})"
            for w in self.weights
            if w.pattern_holds is False
        ]
        return found

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        def clean(value):
            if isinstance(value, float) and not math.isfinite(value):
                return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
            return value

        outputs = [
            {k: clean(v) for k, v in asdict(o).items()} | {"passed": o.passed} for o in self.outputs
        ]
        return {
            "passed": self.passed,
            "samples": self.samples,
            "tolerances": asdict(self.tolerances),
            "outputs": outputs,
            "weights": [asdict(w) for w in self.weights],
            "failures": self.failures,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        def number(value, form: str) -> str:
            return "-" if value is None else format(value, form)

        exact = any(o.exact for o in self.outputs)
        rows = [
            [
                o.name,
                "x".join(map(str, o.shape)),
                f"{o.max_abs:.3g}",
                f"{o.mean_abs:.3g}",
                number(o.rel_l2, ".3g"),
                number(o.snr_db, ".1f"),
                number(o.psnr_db, ".1f"),
                number(o.cosine, ".6f"),
                *([f"{o.match_rate:.4f} ({o.mismatches} differ)" if o.exact else "-"] * exact),
                "ok" if o.passed else "FAIL",
            ]
            for o in self.outputs
        ]
        header = ["output", "shape", "max abs", "mean abs", "rel L2", "SNR dB", "PSNR dB", "cosine"]
        text = format_table([*header, *(["match"] * exact), ""], rows)
        checked = [w for w in self.weights if w.pattern is not None or w.sparse]
        if checked:
            wrows = [
                [
                    w.name,
                    w.format,
                    round(w.sparsity, 4),
                    w.pattern or "-",
                    {None: "-", True: "holds", False: "BROKEN"}[w.pattern_holds],
                ]
                for w in checked
            ]
            text += "\n\n" + format_table(
                ["weight", "format", "sparsity", "pattern", "check"], wrows
            )
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return f"{text}\n\n{verdict} ({self.samples} input samples)"


# -- inputs -----------------------------------------------------------------------------------

_ARRAY_DTYPES = {  # coremltools.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    65568: np.float32,  # FLOAT32
    65552: np.float16,  # FLOAT16
    65600: np.float64,  # DOUBLE
    131104: np.int32,  # INT32
    131080: np.int8,  # INT8
}


def _default_shape(array_type) -> list[int]:
    shape = [int(d) for d in array_type.shape]
    which = array_type.WhichOneof("ShapeFlexibility")
    if which == "enumeratedShapes" and not shape:
        shape = [int(d) for d in array_type.enumeratedShapes.shapes[0].shape]
    elif which == "shapeRange" and not shape:
        shape = [int(r.lowerBound) for r in array_type.shapeRange.sizeRanges]
    return shape


# Ops an index goes through unchanged on its way to a gather: casts, shape changes, and the
# negative-index wrap (`select(x >= 0, x, x + size)`) that converters emit. Arithmetic that
# scales an index (mul, ...) is not followed.
_INDEX_PASSTHROUGH = frozenset(
    {
        "cast", "reshape", "squeeze", "expand_dims", "transpose", "identity", "slice_by_index",
        "slice_by_size", "tile", "concat", "select", "add", "sub", "greater_equal", "less",
    }
)  # fmt: skip


def _gather_bound(func, name: str) -> int | None:
    """Smallest table size among the gathers that integer input `name` indexes (through
    `_INDEX_PASSTHROUGH` ops), or None if it indexes no gather."""
    start = func.inputs.get(name)
    if start is None:
        return None
    bound, frontier, seen = None, [start], set()
    while frontier:
        var = frontier.pop()
        if id(var) in seen:
            continue
        seen.add(id(var))
        for op in var.child_ops:
            if op.op_type in ("gather", "gather_along_axis") and op.inputs.get("indices") is var:
                axis = int(op.axis.val) if op.axis is not None else 0
                size = op.x.shape[axis]
                if isinstance(size, int):
                    bound = size if bound is None else min(bound, size)
            elif op.op_type in _INDEX_PASSTHROUGH:
                frontier.extend(op.outputs)
    return bound


def integer_input_range(func, name: str, dtype) -> tuple[int, int]:
    """[low, high) of generated values for integer input `name`.

    An input that indexes a gather (an embedding's token ids) spans the smallest table it
    indexes. Any other integer input is taken for a mask or flag used in arithmetic (an
    attention mask turned into `(1 - mask) * -10000`) and gets {0, 1}: wider values would
    overflow such arithmetic in fp16, or mean nothing to the model.
    """
    bound = _gather_bound(func, name)
    high = 2 if bound is None else bound
    return 0, min(high, int(np.iinfo(dtype).max) + 1)


def _input_descriptions(mlmodel, function: str):
    """The input descriptions of `function` (a multifunction model keeps them per function)."""
    description = mlmodel.get_spec().description
    for fdesc in description.functions:
        if fdesc.name == function:
            return list(fdesc.input)
    return list(description.input)


def default_function(mlmodel, prog) -> str:
    """The function verify runs: the model's default function (`main` for single-function
    models, `defaultFunctionName` for multifunction ones)."""
    default = mlmodel.get_spec().description.defaultFunctionName if mlmodel is not None else ""
    if default and default in prog.functions:
        return default
    if "main" in prog.functions:
        return "main"
    return next(iter(prog.functions))


def generate_inputs(
    mlmodel, prog, samples: int = 4, seed: int = 0, function: str | None = None
) -> list[dict[str, np.ndarray]]:
    """Random inputs from the model's input description, deterministic for a seed.

    Floats: standard normal. Images: uniform over [0, 255]. Integers: see
    `integer_input_range` (a gather's table for indices, {0, 1} otherwise). Flexible shapes
    use their declared default.
    """
    _check_count("samples", samples, low=1)
    _check_count("seed", seed, low=0)
    function = function or default_function(mlmodel, prog)
    func = prog.functions[function]
    rng = np.random.default_rng(seed)
    feeds = []
    descriptions = _input_descriptions(mlmodel, function)
    for _ in range(samples):
        feed = {}
        for spec_input in descriptions:
            kind = spec_input.type.WhichOneof("Type")
            if kind == "imageType":
                image = spec_input.type.imageType
                channels = 1 if image.colorSpace == 10 else 3
                feed[spec_input.name] = rng.uniform(
                    0, 255, (1, channels, image.height, image.width)
                ).astype(np.float32)
                continue
            if kind != "multiArrayType":
                raise UnsupportedModelError(
                    f"input {spec_input.name!r} is a {kind}; pass inputs to verify explicitly"
                )
            array = spec_input.type.multiArrayType
            shape = _default_shape(array)
            dtype = _ARRAY_DTYPES.get(array.dataType)
            if dtype is None:
                raise UnsupportedModelError(
                    f"input {spec_input.name!r} has array data type {array.dataType}; "
                    "pass inputs to verify explicitly"
                )
            if np.issubdtype(dtype, np.integer):
                low, high = integer_input_range(func, spec_input.name, dtype)
                feed[spec_input.name] = rng.integers(low, high, shape).astype(dtype)
            else:
                feed[spec_input.name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _read_inputs(inputs, func) -> list[dict[str, np.ndarray]]:
    """One sample per .npz (entries keyed by input name; states may be given), or the dicts."""
    if isinstance(inputs, (str, Path)):
        required, states = _input_names(func)
        return [read_npz(inputs, required, states, what="inputs")]
    if isinstance(inputs, Mapping):
        return [dict(inputs)]
    if isinstance(inputs, Sequence) and all(isinstance(i, Mapping) for i in inputs):
        if not inputs:
            raise ConfigError("inputs is an empty list; give at least one sample")
        return [dict(i) for i in inputs]
    raise ConfigError("inputs must be a dict of arrays, a list of such dicts, or an .npz path")


def _input_names(func) -> tuple[list[str], list[str]]:
    """(inputs a sample must give, state inputs it may give: they start at zeros otherwise)."""
    from milsparse.ir.interpreter import is_state

    states = [name for name, var in func.inputs.items() if is_state(var)]
    return [name for name in func.inputs if name not in states], states


def _check_feeds(feeds: list[dict], func) -> None:
    """Every sample names exactly the function's inputs (state inputs may be left out), each a
    real numeric array whose values the input's dtype can hold (shapes are the interpreter's
    to check)."""
    required, states = _input_names(func)
    for i, feed in enumerate(feeds):
        where = f"input sample {i}" if len(feeds) > 1 else "inputs"
        problem = name_problem(feed, required, states)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        for name, value in feed.items():
            kind = np.asarray(value).dtype.kind
            if kind not in "biuf":
                what = {"c": "complex", "U": "string", "S": "bytes", "O": "object"}.get(kind, kind)
                raise ConfigError(
                    f"{where}: {name!r} is a {what} array; inputs must be real numbers"
                )
            check_input_value(name, value, func.inputs[name], where)


# -- metrics ----------------------------------------------------------------------------------


def _db(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.inf
    if numerator == 0:
        return -math.inf
    return 10 * math.log10(numerator / denominator)


def compare_outputs(references: list[dict], outputs: list[dict], tol: Tolerances):
    """Per output name, `output_metrics` over all samples at once (outputs concatenated)."""
    names = list(references[0])
    return [
        output_metrics(
            name,
            np.concatenate([np.asarray(r[name]).ravel() for r in references]),
            np.concatenate([np.asarray(o[name]).ravel() for o in outputs]),
            tol,
        )
        for name in names
    ]


def _is_exact(values: np.ndarray) -> bool:
    """Integer and bool outputs are labels, indices or masks: compared exactly."""
    return values.dtype.kind in "biu"


def output_metrics(name: str, ref: np.ndarray, cand: np.ndarray, tol: Tolerances) -> OutputMetrics:
    """The metrics of one output (all samples) and the tolerances it misses. Integer and bool
    outputs get `exact_metrics`; float ones the signal metrics."""
    ref, cand = np.asarray(ref), np.asarray(cand)
    if ref.shape != cand.shape:
        return OutputMetrics(
            name,
            tuple(np.shape(ref)),
            math.inf,
            math.inf,
            math.inf,
            -math.inf,
            -math.inf,
            0.0,
            [f"shape {np.shape(cand)} != {np.shape(ref)}"],
        )
    if _is_exact(ref) or _is_exact(cand):
        return exact_metrics(name, ref, cand, tol)
    return _signal_metrics(name, ref, cand, tol)


def exact_metrics(name: str, ref: np.ndarray, cand: np.ndarray, tol: Tolerances) -> OutputMetrics:
    """Integer or bool output: how many values differ, and the largest difference. An argmax
    that moves by one class is wrong, however high the SNR of the indices as floats."""
    r, c = ref.ravel(), cand.ravel()
    differ = r != c
    mismatches = int(np.count_nonzero(differ))
    # the differences of int64 values can exceed int64: measure them in float64
    err = np.abs(c.astype(np.float64) - r.astype(np.float64))
    m = OutputMetrics(
        name=name,
        shape=tuple(ref.shape),
        max_abs=float(err.max()) if r.size else 0.0,
        mean_abs=float(err.mean()) if r.size else 0.0,
        rel_l2=None,
        snr_db=None,
        psnr_db=None,
        cosine=None,
        exact=True,
        mismatches=mismatches,
        match_rate=1.0 - mismatches / r.size if r.size else 1.0,
    )
    if tol.max_mismatch is not None and mismatches > tol.max_mismatch * r.size:
        m.failures.append(
            f"{mismatches} of {r.size} values differ (match rate {m.match_rate:.4g}; "
            f"max_mismatch {tol.max_mismatch:g})"
        )
    return m


def _signal_metrics(name: str, ref: np.ndarray, cand: np.ndarray, tol: Tolerances):
    r = np.asarray(ref, dtype=np.float64).ravel()
    c = np.asarray(cand, dtype=np.float64).ravel()
    err = c - r
    noise = float(err @ err)
    signal = float(r @ r)
    if noise == 0:
        # Identical outputs: exactly cosine 1 and infinite SNR. Computed, the cosine of two equal
        # vectors can come out one ulp below 1 (sqrt(r.r) * sqrt(c.c) rounds differently from
        # r.c, and how depends on the BLAS build).
        cosine = 1.0
    else:
        norms = math.sqrt(signal * float(c @ c))
        cosine = float(r @ c) / norms if norms else 0.0
        cosine = min(max(cosine, -1.0), 1.0)  # rounding can step just past 1
    peak = float(np.max(r * r)) if r.size else 0.0
    m = OutputMetrics(
        name=name,
        shape=tuple(np.shape(ref)),
        max_abs=float(np.max(np.abs(err))) if r.size else 0.0,
        mean_abs=float(np.mean(np.abs(err))) if r.size else 0.0,
        rel_l2=math.sqrt(noise / signal) if signal else (0.0 if noise == 0 else math.inf),
        snr_db=_db(signal, noise),
        psnr_db=_db(peak, noise / max(r.size, 1)),
        cosine=cosine,
    )
    if not np.all(np.isfinite(c)):
        m.failures.append("non-finite values")
    if tol.min_snr_db is not None and m.snr_db < tol.min_snr_db:
        m.failures.append(f"SNR {m.snr_db:.1f} dB < {tol.min_snr_db:g}")
    if tol.min_cosine is not None and m.cosine < tol.min_cosine:
        m.failures.append(f"cosine {m.cosine:.6f} < {tol.min_cosine:g}")
    if tol.max_rel_l2 is not None and m.rel_l2 > tol.max_rel_l2:
        m.failures.append(f"relative L2 {m.rel_l2:.3g} > {tol.max_rel_l2:g}")
    if tol.max_abs is not None and m.max_abs > tol.max_abs:
        m.failures.append(f"max abs error {m.max_abs:.3g} > {tol.max_abs:g}")
    return m


# -- weight pattern checks --------------------------------------------------------------------


def _pattern_holds(weight: np.ndarray, spec: str, axis: int) -> tuple[bool, str]:
    from milsparse.passes.config import parse_prune_spec

    parsed = parse_prune_spec(spec)
    zero = weight == 0
    if parsed.pattern == "n:m":
        n, m = parsed.n, parsed.m
        rows = np.moveaxis(zero, axis, -1).reshape(-1, weight.shape[axis])
        for start in range(0, rows.shape[1], m):
            group = rows[:, start : start + m]
            need = n if group.shape[1] == m else masks.round_half_up(n * group.shape[1] / m)
            short = int(np.count_nonzero(group.sum(axis=1) < need))
            if short:
                return False, f"{short} groups at offset {start} have fewer than {need} zeros"
        return True, "every group has its zeros"
    if parsed.pattern == "block":
        moved = np.moveaxis(zero, axis, 0)
        size = parsed.block_size
        nblocks = -(-moved.shape[0] // size)
        pad = nblocks * size - moved.shape[0]
        padded = np.concatenate([moved, np.ones((pad,) + moved.shape[1:], bool)]) if pad else moved
        blocks = padded.reshape((nblocks, size) + moved.shape[1:]).all(axis=1)
        need = masks.round_half_up(parsed.sparsity * blocks.size)
        have = int(blocks.sum())
        if have < need:
            return False, f"{have} all-zero blocks, expected at least {need}"
        return True, f"{have} all-zero blocks"
    if parsed.pattern == "magnitude" and parsed.scope == "channel":
        rows = np.moveaxis(zero, axis, 0).reshape(weight.shape[axis], -1)
        need = masks.round_half_up(parsed.sparsity * rows.shape[1])
        short = int(np.count_nonzero(rows.sum(axis=1) < need))
        if short:
            return False, f"{short} output channels have fewer than {need} zeros"
        return True, f"every output channel has {need} zeros"
    return True, "unstructured"


def declared_pruning(model) -> dict[str, dict]:
    """{weight: {"spec", "axis"}} that milsparse recorded in `model`'s metadata ({} if none)."""
    meta = model.get_spec().description.metadata.userDefined
    return json.loads(meta[PRUNE_METADATA_KEY]) if PRUNE_METADATA_KEY in meta else {}


def _weight_checks(candidate_model, candidate_prog, function: str) -> list[WeightCheck]:
    """Format, sparsity and declared pattern of each compressed weight (any form) of
    `function`, nested blocks included; a weight with a declared pattern is decoded here, one
    at a time."""
    declared = declared_pruning(candidate_model)
    func = candidate_prog.functions[function]
    sparse_ops = {op.name: op for op in walk_ops(func) if op.op_type == "constexpr_sparse_to_dense"}
    checks = []
    for row in weight_table(candidate_prog, functions=[function]):
        if row.format == "dense" and row.name not in declared:
            continue
        check = WeightCheck(row.name, row.format, row.sparsity, sparse=row.sparse)
        info = declared.get(row.name)
        if info:
            check.pattern = info["spec"]
            op = sparse_ops.get(row.name)
            if info.get("axis") is not None and op is not None:
                (weight,) = static_values(op)
                check.pattern_holds, check.detail = _pattern_holds(
                    weight, info["spec"], info["axis"]
                )
        checks.append(check)
    return checks


# -- entry points -----------------------------------------------------------------------------


def _program_of(model):
    """(MLModel or None, Program) of a Program, MLModel or path."""
    from coremltools.converters.mil.mil import Program

    if isinstance(model, Program):
        return None, model
    mlmodel = package.open_model(model)
    return mlmodel, package.load_program(mlmodel)


def evaluate(model, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Run a Program, MLModel or saved package on `inputs` with the numpy reference interpreter."""
    _, prog = _program_of(model)
    return evaluate_program(prog, inputs)


def verify(
    reference,
    candidate,
    inputs=None,
    *,
    tolerances: Tolerances | None = None,
    samples: int = 4,
    seed: int = 0,
    function: str | None = None,
) -> VerifyReport:
    """Compare `candidate` with `reference` (Programs, MLModels or paths) on the same inputs.

    `inputs`: a dict of arrays, a list of dicts, or an .npz path; by default `samples` random
    inputs generated from the reference's input description with `seed` (see
    `generate_inputs`). A reference whose outputs are not finite on the inputs is a
    ConfigError: the comparison would mean nothing, and it is not the candidate's fault.
    `function`: which function of a multifunction model to run (default: its default one).
    The samples run together through the interpreter (`Cursor`): each weight is decoded once
    for all of them and dropped after its stretch of ops, so a large model needs no float32
    copy of itself.
    """
    tolerances = tolerances or Tolerances()
    _check_count("samples", samples, low=1)
    _check_count("seed", seed, low=0)
    ref_model, ref_prog = _program_of(reference)
    cand_model, cand_prog = _program_of(candidate)
    if function is None:
        function = default_function(ref_model, ref_prog)
    elif function not in ref_prog.functions:
        raise ConfigError(
            f"the reference has no function {function!r} (it has {sorted(ref_prog.functions)})"
        )
    if function not in cand_prog.functions:
        raise UnsupportedModelError(
            f"the candidate has no function {function!r} (it has {sorted(cand_prog.functions)})"
        )
    ref_fn, cand_fn = ref_prog.functions[function], cand_prog.functions[function]
    for what, ref_names, cand_names in (
        ("inputs", list(ref_fn.inputs), list(cand_fn.inputs)),
        ("outputs", [v.name for v in ref_fn.outputs], [v.name for v in cand_fn.outputs]),
    ):
        if sorted(ref_names) != sorted(cand_names):
            raise UnsupportedModelError(
                f"the models have different {what}: {sorted(ref_names)} vs {sorted(cand_names)}; "
                "is the candidate a compression of this reference?"
            )
    generated = inputs is None
    if generated:
        if ref_model is None:
            raise ConfigError("give inputs when the reference is a Program (no input description)")
        feeds = generate_inputs(ref_model, ref_prog, samples=samples, seed=seed, function=function)
    else:
        feeds = _read_inputs(inputs, ref_fn)
    _check_feeds(feeds, ref_fn)
    ref_out: dict[str, list] = {}
    cand_out: dict[str, list] = {}
    for i, outputs in enumerate(run_samples(ref_prog, feeds, function)):
        for name, value in outputs.items():
            if not np.all(np.isfinite(value)):
                raise ConfigError(_non_finite_reference(name, i, generated))
            ref_out.setdefault(name, []).append(value)
    for outputs in run_samples(cand_prog, feeds, function):
        for name, value in outputs.items():
            cand_out.setdefault(name, []).append(value)
    outputs = []
    for name in ref_out:
        metrics = output_metrics(
            name, np.stack(ref_out[name]), np.stack(cand_out[name]), tolerances
        )
        metrics.shape = metrics.shape[1:]  # one sample's shape; metrics cover all samples
        outputs.append(metrics)
    weights = _weight_checks(cand_model, cand_prog, function) if cand_model is not None else []
    return VerifyReport(outputs, weights, tolerances, len(feeds))


def _non_finite_reference(output: str, sample: int, generated: bool) -> str:
    if generated:
        return (
            f"the reference model's output {output!r} is not finite (inf or nan) on generated "
            f"input sample {sample}: the generated inputs are not ones this model can run. "
            "Pass real inputs (CLI: --inputs FILE.npz; API: inputs=...)"
        )
    return (
        f"the reference model's output {output!r} is not finite (inf or nan) on input sample "
        f"{sample}; verify needs inputs on which the reference itself is finite"
    )
