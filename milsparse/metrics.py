"""Output metrics: how far a candidate's outputs moved from the reference's, and the verdict
against `Tolerances`.

Float outputs get max and mean absolute error, relative L2 error, SNR and PSNR in dB and cosine
similarity; integer and bool outputs (labels, indices, masks) are compared exactly (match rate).
`compare_outputs` is the one loop over outputs and samples, for `verify` and for the allocation
search alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from milsparse.errors import ConfigError

__all__ = ["Tolerances", "OutputMetrics", "compare_outputs", "output_metrics", "exact_metrics"]


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


def _db(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.inf
    if numerator == 0:
        return -math.inf
    return 10 * math.log10(numerator / denominator)


def compare_outputs(references: list[dict], outputs: list[dict], tol: Tolerances):
    """Per output name, `output_metrics` over all samples at once; `shape` is one sample's.
    A sample whose output shapes differ makes that output fail."""
    metrics = []
    for name in references[0]:
        refs = [np.asarray(r[name]) for r in references]
        cands = [np.asarray(o[name]) for o in outputs]
        differ = next(
            (i for i, (r, c) in enumerate(zip(refs, cands, strict=True)) if r.shape != c.shape),
            None,
        )
        if differ is not None:
            m = output_metrics(name, refs[differ], cands[differ], tol)
        else:
            m = output_metrics(
                name,
                np.concatenate([r.ravel() for r in refs]),
                np.concatenate([c.ravel() for c in cands]),
                tol,
            )
            m.shape = tuple(refs[0].shape)
        metrics.append(m)
    return metrics


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
