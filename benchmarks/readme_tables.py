"""Render the benchmark tables of docs/benchmarks.md from `benchmarks/results/*.json`.

    python benchmarks/readme_tables.py          # rewrite the tables between the markers
    python benchmarks/readme_tables.py --check  # exit 1 if the page differs from the results

The tables sit between `<!-- NAME -->` and `<!-- /NAME -->` markers; the numbers come only from
the results files the benchmark scripts write, so the page shows what was measured.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"


def _table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def interpreter_table() -> str:
    data = json.loads((RESULTS / "interpreter.json").read_text())
    rows = []
    for r in data["rows"]:
        fidelity = (
            f"max rel err {r['max_rel_err']:.1e}"
            if "max_rel_err" in r
            else f"cosine {r['cosine']:.7f}"
        )
        rows.append([r["case"], r["precision"], r["ops"], f"{r['torch_ms']:.2f}",
                     f"{r['interpreter_ms']:.2f}", f"{r['ratio']:.2f}x", fidelity])  # fmt: skip
    headers = ["model", "precision", "ops", "torch ms", "interpreter ms", "ratio", "vs torch"]
    return _table(headers, rows)


def scope_table() -> str:
    data = json.loads((RESULTS / "scope.json").read_text())
    rows = [
        [f"`{r['spec']}`", r["scope"], f"{r['logits_cosine']:.4f}", f"{r['logits_snr_db']:.2f}",
         f"{100 * r['dead_output_channels']:.1f}%"]
        for r in data["rows"]
    ]  # fmt: skip
    headers = ["spec", "scope", "logits cosine", "logits SNR dB", "output channels left all zero"]
    return _table(headers, rows)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def joint_quality_table() -> str:
    data = json.loads((RESULTS / "joint.json").read_text())
    rows = [
        [f"{r['nbits']}-bit", f"{r['milsparse_rel_error']:.5f}",
         f"{r['coremltools_rel_error']:.5f}",
         f"{r['coremltools_rel_error'] / r['milsparse_rel_error']:.2f}x",
         _mib(r["milsparse_size"]), _mib(r["coremltools_size"]),
         f"{100 * (r['milsparse_size'] / r['coremltools_size'] - 1):+.2f}%"]
        for r in data["quality"]
    ]  # fmt: skip
    headers = ["2:4, then palettized", "milsparse kept-value error", "coremltools error",
               "coremltools / milsparse", "milsparse size", "coremltools size",
               "size vs coremltools"]  # fmt: skip
    return _table(headers, rows)


def joint_speed_table() -> str:
    data = json.loads((RESULTS / "joint.json").read_text())
    rows = []
    for r in data["speed"]:
        m, c = r["milsparse"], r["coremltools"]
        rows.append(
            [r["setting"], f"{m['seconds']:.1f}", f"{c['seconds']:.1f}",
             f"{c['seconds'] / m['seconds']:.1f}x", _mib(m["peak_above_import"]),
             _mib(c["peak_above_import"]), f"{m['peak_above_import'] / r['dense_size']:.2f}",
             _mib(m["size"]), _mib(c["size"])]
        )  # fmt: skip
    headers = ["setting", "milsparse s", "coremltools s", "speedup", "milsparse peak",
               "coremltools peak", "milsparse peak / dense size", "milsparse size",
               "coremltools size"]  # fmt: skip
    return _table(headers, rows)


def data_aware_table() -> str:
    data = json.loads((RESULTS / "data_aware.json").read_text())
    return _criteria_table(data["digits"]) + "\n\n" + _bert_table(data)


def data_aware_transformer_table() -> str:
    data = json.loads((RESULTS / "data_aware.json").read_text())
    return _criteria_table(data["transformer"])


def _criteria_table(measured: list[dict]) -> str:
    data = {"digits": measured}
    dense = next(r for r in data["digits"] if r["pattern"] == "dense")
    rows = [["dense", "-", "-", f"{100 * dense['accuracy']:.2f}%", f"{dense['loss']:.4f}", "-",
             "-", "-"]]  # fmt: skip
    for r in data["digits"]:
        if r["pattern"] == "dense":
            continue
        baseline = "plain fit" if " + " in r["pattern"] else "uniform"
        magnitude = next(
            m for m in data["digits"]
            if m["pattern"] == r["pattern"] and m["criterion"] == "magnitude"
            and m["allocate"] == baseline
        )  # fmt: skip
        lost = magnitude["loss"] - dense["loss"]
        removed = (
            "-" if r is magnitude or lost <= 0
            else f"{100 * (magnitude['loss'] - r['loss']) / lost:.0f}%"
        )  # fmt: skip
        rows.append([f"`{r['pattern']}`", r["criterion"], r["allocate"],
                     f"{100 * r['accuracy']:.2f}%", f"{r['loss']:.4f}", removed,
                     f"{r['stored_bytes'] / 1024:.1f} KiB", f"{r['seconds']:.1f}"])  # fmt: skip
    headers = ["pattern", "criterion", "allocation", "held-out accuracy", "held-out loss",
               "share of the baseline's loss increase removed", "weights stored",
               "prune s"]  # fmt: skip
    return _table(headers, rows)


def _bert_table(data: dict) -> str:
    bert = [
        [r["criterion"], f"{r['seconds']:.1f}", f"{r['peak'] / 2**20:.0f} MiB",
         f"{r['model_size'] / 2**20:.1f} MiB", f"{r['peak'] / r['model_size']:.1f}x"]
        for r in data["bert_small"]
    ]  # fmt: skip
    headers = ["criterion (BERT-small, 50%)", "seconds", "peak above imports", "model",
               "peak / model"]  # fmt: skip
    return _table(headers, bert)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def large_table() -> str:
    data = json.loads((RESULTS / "large.json").read_text())
    dense = data["model"]["size"]
    rows = []
    for r in data["rows"]:
        m, one, c = r["milsparse_all"], r["milsparse_1"], r["coremltools"]
        ok = "error" not in c
        rows.append(
            [r["setting"], f"{m['seconds']:.1f}", f"{one['seconds']:.1f}",
             f"{c['seconds']:.1f}" if ok else "error",
             f"{c['seconds'] / m['seconds']:.1f}x" if ok else "-",
             _mib(m["peak_above_import"]), _mib(one["peak_above_import"]),
             _gib(c["peak_above_import"]) if ok else "-",
             f"{m['peak_above_import'] / dense:.3f}", "yes" if r["identical_bytes"] else "NO",
             _gib(m["size"]), _gib(c["size"]) if ok else "-"]
        )  # fmt: skip
    headers = ["setting", "milsparse s (all cores)", "milsparse s (--jobs 1)", "coremltools s",
               "speedup", "milsparse peak", "milsparse peak (--jobs 1)", "coremltools peak",
               "milsparse peak / dense", "same bytes, 1 job and all", "milsparse size",
               "coremltools size"]  # fmt: skip
    table = _table(headers, rows)
    huge = data.get("huge")
    if huge and "skipped" not in huge:
        run = huge["2:4"]
        table += "\n\n" + _table(
            ["generated model", "parameters", "package", "2:4, all cores: s", "peak",
             "peak / dense", "output"],
            [["linear stack", f"{huge['model']['params'] / 1e9:.2f}B",
              _gib(huge["model"]["size"]), f"{run['seconds']:.1f}",
              _mib(run["peak_above_import"]),
              f"{run['peak_above_import'] / huge['model']['size']:.3f}", _gib(run["size"])]],
        )  # fmt: skip
    return table


TABLES = {
    "interpreter": interpreter_table,
    "scope": scope_table,
    "joint-quality": joint_quality_table,
    "joint-speed": joint_speed_table,
    "data-aware": data_aware_table,
    "data-aware-transformer": data_aware_transformer_table,
    "large": large_table,
}


def render(text: str) -> str:
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- {name} -->\n).*?(<!-- /{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{PAGE.name} has no <!-- {name} --> markers")
        table = make()
        text = pattern.sub(lambda m, t=table: m.group(1) + t + "\n" + m.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = PAGE.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("docs/benchmarks.md tables differ from benchmarks/results; run readme_tables.py")
            return 1
        return 0
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
