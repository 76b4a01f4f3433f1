"""What a compression pass decided for each weight: the rows of the compress report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["NOT_A_WEIGHT", "WeightDecision", "combine"]

# How a pass's reason begins for a const it looked at that feeds no weight operand (a bias, a
# norm's gamma): such rows are reported, but not counted among the weights.
NOT_A_WEIGHT = "not a weight"


@dataclass(frozen=True)
class WeightDecision:
    """One weight the pass looked at.

    `compressed` says whether it was rewritten; when not, `reason` says why ("1-D", "small: ...",
    "sparse form would be larger: ...", ...). Sparsity is the fraction of zeros in the weight as
    it leaves the pass; bytes follow `milsparse.ir.formats`' accounting.
    """

    name: str
    consumers: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    compressed: bool
    reason: str | None = None
    spec: str | None = None
    axis: int | None = None
    sparsity: float = 0.0
    dense_bytes: int = 0
    stored_bytes: int = 0
    note: str | None = None
    function: str | None = None  # set for multifunction programs
    shared_with: str | None = None  # the function whose row counts this shared weight's bytes

    @property
    def is_weight(self) -> bool:
        """Whether the const is a layer's weight (a bias or a norm's parameter is not)."""
        return self.compressed or not (self.reason or "").startswith(NOT_A_WEIGHT)

    @property
    def bytes_saved(self) -> int:
        return self.dense_bytes - self.stored_bytes

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["consumers"] = list(self.consumers)
        row["shape"] = list(self.shape)
        return row


def combine(step_reports: list[tuple[str, list[WeightDecision]]]) -> list[WeightDecision]:
    """One row per weight from the reports of several steps (`(kind, decisions)` in the order
    they ran): the spec is the compressing steps' specs joined by ` + ` (`2:4 + lut4`), the
    stored bytes and sparsity are the last compressing step's, the dense bytes the first's; a
    weight no step compressed keeps every distinct reason; a later step's reason for leaving a
    compressed weight as it is becomes a note."""
    if len(step_reports) == 1:
        return list(step_reports[0][1])
    rows: dict[tuple, list[tuple[str, WeightDecision]]] = {}
    for kind, decisions in step_reports:
        for d in decisions:
            rows.setdefault((d.function, d.name), []).append((kind, d))
    out = []
    for seen in rows.values():
        first = seen[0][1]
        done = [(k, d) for k, d in seen if d.compressed]
        if not done:
            other = next((d for _, d in seen if not d.is_weight), None)
            if other is not None:  # every pass reads weights through the same operands
                out.append(other)
                continue
            reasons = list(dict.fromkeys(d.reason for _, d in seen if d.reason))
            if len(reasons) > 1:
                reasons = [f"{k}: {d.reason}" for k, d in seen if d.reason]
            out.append(replace(first, reason="; ".join(dict.fromkeys(reasons)) or None))
            continue
        last = done[-1][1]
        specs = [d.spec.removeprefix("sparse+") if i else d.spec for i, (_, d) in enumerate(done)]
        notes = [d.note for _, d in done if d.note]
        notes += [f"{k}: {d.reason}" for k, d in seen if not d.compressed and d.reason]
        out.append(
            replace(
                last,
                spec=" + ".join(specs),
                dense_bytes=first.dense_bytes,
                note="; ".join(dict.fromkeys(notes)) or None,
            )
        )
    return out
