"""Reports milsparse prints and serialises: what compress did, what a model holds."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the table formatter is used where coremltools is not imported
    from milsparse.ir.weights import WeightRow
    from milsparse.passes.decisions import WeightDecision

__all__ = ["CompressReport", "InspectReport", "display_spec", "format_table", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left-aligned text table (numbers right-aligned)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(row):
        cols = zip(row, widths, numeric, strict=True)
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in cols]
        return "  ".join(parts).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _json_safe(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN or inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _with_functions(headers, rows, items):
    """Add a function column when the rows come from several functions."""
    if len({getattr(i, "function", None) for i in items}) < 2:
        return headers, rows
    return ["function", *headers], [[i.function, *r] for i, r in zip(items, rows, strict=True)]


_LONG_DECIMAL = re.compile(r"\d+\.\d{5,}(?:e-?\d+)?")


def display_spec(spec: str | None) -> str | None:
    """A spec as a table shows it: long fractions rounded to 4 significant digits
    (`unstructured:0.4667`); reports' JSON and the model's metadata keep the exact text."""
    if spec is None:
        return None
    return _LONG_DECIMAL.sub(lambda m: f"{float(m.group()):.4g}", spec)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class CompressReport:
    """Per-weight decisions of a compress run, with totals."""

    decisions: list[WeightDecision] = field(default_factory=list)
    target: str | None = None
    notes: list[str] = field(default_factory=list)
    # allocate global/budget: {weight: {"sparsity": grid, "error": curve, "chosen": s}}
    allocation: dict[str, dict] = field(default_factory=dict)

    @property
    def compressed(self) -> list[WeightDecision]:
        return [d for d in self.decisions if d.compressed]

    def totals(self) -> dict[str, Any]:
        # a weight the functions of a multifunction package share is stored, and counted, once
        own = [d for d in self.decisions if d.shared_with is None]
        dense = sum(d.dense_bytes for d in own)
        stored = sum(d.stored_bytes for d in own)
        return {
            "weights": sum(1 for d in own if d.is_weight),
            "compressed": sum(1 for d in own if d.compressed),
            "other_constants": sum(1 for d in own if not d.is_weight),
            "dense_bytes": dense,
            "stored_bytes": stored,
            "bytes_saved": dense - stored,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "weights": [d.to_dict() for d in self.decisions],
            "totals": self.totals(),
            "notes": list(self.notes),
            **({"allocation": self.allocation} if self.allocation else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        rows = []
        for d in self.decisions:
            what = display_spec(d.spec) if d.compressed else f"dense: {d.reason}"
            if d.note:
                what += f" ({d.note})"
            stored = human_bytes(d.stored_bytes)
            if d.shared_with is not None:
                stored = f"shared with {d.shared_with}"
            rows.append(
                [
                    d.name,
                    "x".join(map(str, d.shape)),
                    d.dtype,
                    round(d.sparsity, 4),
                    human_bytes(d.dense_bytes),
                    stored,
                    what,
                ]
            )
        headers = ["weight", "shape", "dtype", "sparsity", "dense", "stored", "result"]
        table = format_table(*_with_functions(headers, rows, self.decisions))
        t = self.totals()
        others = t["other_constants"]
        summary = (
            f"{t['compressed']} of {t['weights']} weights compressed"
            + (
                f" ({others} other constant{'s' * (others != 1)} left as they are)"
                if others
                else ""
            )
            + f"; {human_bytes(t['dense_bytes'])} -> {human_bytes(t['stored_bytes'])} "
            f"(saved {human_bytes(t['bytes_saved'])})"
        )
        notes = "".join(f"\nnote: {n}" for n in self.notes)
        return f"{table}\n{summary}{notes}"


@dataclass
class InspectReport:
    """The weight table of a model (see `milsparse.ir.weights`)."""

    rows: list[WeightRow]
    path: str | None = None

    def totals(self) -> dict[str, Any]:
        own = [r for r in self.rows if r.shared_with is None]  # shared weights count once
        n = sum(r.num_elements for r in own)
        stored = sum(r.stored_bytes for r in own)
        return {
            "weights": len(own),
            "elements": n,
            "dense_bytes": sum(r.dense_bytes for r in own),
            "stored_bytes": stored,
            "bits_per_weight": 8.0 * stored / n if n else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "weights": [r.to_dict() for r in self.rows],
            "totals": self.totals(),
        }

    def to_json(self) -> str:
        # an unknown sparsity (a palettized or quantized weight has no mask) is NaN: JSON null
        return json.dumps(_json_safe(self.to_dict()), indent=2, allow_nan=False, default=str)

    def __str__(self) -> str:
        rows = [
            [
                r.name,
                ",".join(r.consumers),
                "x".join(map(str, r.shape)),
                r.dtype,
                r.format,
                "-" if r.sparsity != r.sparsity else round(r.sparsity, 4),
                human_bytes(r.stored_bytes) if r.shared_with is None else f"= {r.shared_with}",
                round(r.bits_per_weight, 2),
            ]
            for r in self.rows
        ]
        headers = [
            "weight",
            "consumers",
            "shape",
            "dtype",
            "format",
            "sparsity",
            "stored",
            "bits/w",
        ]
        if any(len(r.read_by) > 1 for r in self.rows):  # a multifunction package's sharing
            headers.append("read by")
            for row, r in zip(rows, self.rows, strict=True):
                row.append(",".join(r.read_by))
        table = format_table(*_with_functions(headers, rows, self.rows))
        t = self.totals()
        return (
            f"{table}\n{t['weights']} weights, {t['elements']} elements: "
            f"{human_bytes(t['dense_bytes'])} dense, {human_bytes(t['stored_bytes'])} stored, "
            f"{t['bits_per_weight']:.2f} bits/weight"
        )
