"""Check a compressed model against its reference on any OS, through the numpy interpreter.

`verify(reference, candidate)` runs both programs on the same inputs (given, or generated from
the model's input description by `milsparse.inputs`) and reports, per output, how far the
candidate moved (`milsparse.metrics`) and, per pruned weight, the sparsity reached and whether
the block or n:m pattern recorded in its metadata (`milsparse.pruning_metadata`) holds. The
verdict compares the metrics with `Tolerances`. `evaluate` runs one model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from milsparse import package
from milsparse.errors import ConfigError, UnsupportedModelError, VerificationError
from milsparse.inputs import default_function, generate_inputs
from milsparse.ir import masks
from milsparse.ir.cursor import run_samples
from milsparse.ir.graph import walk_ops
from milsparse.ir.interpreter import evaluate_program, static_values
from milsparse.ir.samples import as_samples
from milsparse.ir.weights import weight_table
from milsparse.metrics import OutputMetrics, Tolerances, compare_outputs
from milsparse.options import VerifyOptions
from milsparse.pruning_metadata import declared_pruning
from milsparse.report import format_table

__all__ = ["WeightCheck", "VerifyReport", "verify", "run_verify", "evaluate"]


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

    def raise_if_failed(self) -> VerifyReport:
        """This report if it passed; else a `VerificationError` listing every failure (for a
        script that should stop on a failed check: `ms.verify(a, b).raise_if_failed()`)."""
        failures = self.failures
        if failures:
            raise VerificationError(
                f"verification failed on {len(failures)} check{'s' * (len(failures) != 1)}: "
                + "; ".join(failures)
            )
        return self

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


def _pattern_holds(weight: np.ndarray, spec: str, axis: int) -> tuple[bool, str]:
    from milsparse.passes.prune_config import parse_prune_spec

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
    if package.is_program(model):
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

    `inputs`: a dict of arrays, a list of dicts, or an .npz path (entries with a leading
    sample axis, as for calibration, or one sample each); by default `samples` random
    inputs generated from the reference's input description with `seed` (see
    `generate_inputs`). A reference whose outputs are not finite on the inputs is a
    ConfigError: the comparison would mean nothing, and it is not the candidate's fault.
    `function`: which function of a multifunction model to run (default: its default one).
    The samples run together through the interpreter (`Cursor`): each weight is decoded once
    for all of them and dropped after its stretch of ops, so a large model needs no float32
    copy of itself.
    """
    options = VerifyOptions.build(
        inputs, tolerances=tolerances, samples=samples, seed=seed, function=function
    )
    return run_verify(reference, candidate, options)


def run_verify(reference, candidate, options: VerifyOptions) -> VerifyReport:
    """Run a checked verify request (`milsparse.options.VerifyOptions`)."""
    inputs, tolerances, function = options.inputs, options.tolerances, options.function
    samples, seed = options.samples, options.seed
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
        feeds = as_samples(inputs, ref_fn, what="inputs")
    references = []
    for i, outputs in enumerate(run_samples(ref_prog, feeds, function)):
        for name, value in outputs.items():
            if not np.all(np.isfinite(value)):
                raise ConfigError(_non_finite_reference(name, i, generated))
        references.append(outputs)
    candidates = run_samples(cand_prog, feeds, function)
    outputs = compare_outputs(references, candidates, tolerances)
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
