"""Large models: milsparse and coremltools side by side on a generated >= 1B-parameter package.

    python benchmarks/bench_large.py [--layers 64] [--width 4096] [--joint] [--huge-layers 0]
                                     [--out benchmarks/results/large.json]

Generates (at run time, never committed) an fp16 package of `--layers` linear layers of
`--width` x `--width` weights distributed like trained ones (`milsparse.fixtures.large`; 64 x
4096^2 = 1.07B parameters, 2.1 GB), then runs, each in its own fresh process: milsparse with
all cores and with `--jobs 1`, and coremltools' `prune_weights`, for 2:4 and unstructured 50%;
with `--joint`, 2:4 then 4-bit palettization (milsparse's one recipe against coremltools' two
calls, `prune_weights` then `palettize_weights(joint_compression=True)`). Reported: wall time
(load + compress + save), peak RSS above the RSS after importing the tool, output size, and
whether the outputs of `--jobs 1` and all cores are byte-identical.

`--huge-layers N` also writes an N-layer package (e.g. 420 x 4096^2 = 7.05B parameters, 14 GB)
and compresses it with milsparse only, 2:4 with all cores, when the disk has room.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write  # noqa: E402
from bench_prune import _peak_bytes, _rss_bytes, run_workers  # noqa: E402

SETTINGS = {"2:4": "2:4", "magnitude 0.5": "unstructured:0.5"}


def worker(tool: str, spec: str, src: str, dst: str, jobs: str) -> dict:
    steps = spec.split("+")
    if tool == "milsparse":
        import milsparse as ms
        import milsparse.api  # noqa: F401  (coremltools loads on first use: import it
        # before the baseline, as the other tool's worker does)

        baseline = _rss_bytes()
        t0 = time.perf_counter()
        ms.compress(src, steps, output=dst, jobs=None if jobs == "all" else int(jobs))
    else:
        import coremltools as ct
        import coremltools.optimize.coreml as cto

        baseline = _rss_bytes()
        t0 = time.perf_counter()
        model = ct.models.MLModel(src, skip_model_load=True)
        prune = steps[0]
        if prune == "2:4":
            op = cto.OpMagnitudePrunerConfig(n_m_ratio=(2, 4))
        else:
            op = cto.OpMagnitudePrunerConfig(target_sparsity=float(prune.split(":")[1]))
        model = cto.prune_weights(model, cto.OptimizationConfig(global_config=op))
        if len(steps) > 1:
            lut = cto.OpPalettizerConfig(nbits=int(steps[1][3:]), mode="kmeans")
            model = cto.palettize_weights(
                model, cto.OptimizationConfig(global_config=lut), joint_compression=True
            )
        model.save(dst)
    return {"seconds": time.perf_counter() - t0, "peak_above_import": _peak_bytes() - baseline}


def _digest(package: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.mlmodel", "weights/weight.bin"):
        with open(package / "Data" / "com.apple.CoreML" / name, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _build(path: Path, layers: int, width: int) -> dict:
    from milsparse.fixtures.large import linear_stack_package

    t0 = time.perf_counter()
    linear_stack_package(
        path, layers=layers, width=width,
        progress=lambda i: print(f"\r  layer {i + 1}/{layers}", end="", file=sys.stderr),
    )  # fmt: skip
    print(file=sys.stderr)
    return {"params": layers * width * width, "size": _size(path),
            "build_seconds": time.perf_counter() - t0}  # fmt: skip


def _run(tool, spec, src, dst, jobs) -> dict:
    print(f"[{spec}] {tool} jobs={jobs} ...", file=sys.stderr, flush=True)
    os.sync()  # the previous step's writes reach the disk first: none is timed in the next
    run = run_workers(__file__, (tool, spec, src, dst, jobs), dst, 1)
    if "error" not in run:
        run["size"] = _size(dst)
        run["digest"] = _digest(dst)
    shutil.rmtree(dst, ignore_errors=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--joint", action="store_true", help="also 2:4 + lut4 (slow for ct)")
    parser.add_argument("--huge-layers", type=int, default=0, help="also a package this large")
    parser.add_argument("--folder", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "large.json"))
    parser.add_argument(
        "--only", metavar="SETTING", help="run this setting only and replace its row in --out "
        "(each row's tools always run side by side, in one run)",
    )  # fmt: skip
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="milsparse-large-", dir=args.folder))
    result: dict = {"rows": []}
    try:
        src = folder / "dense.mlpackage"
        result["model"] = _build(src, args.layers, args.width)
        settings = dict(SETTINGS)
        if args.joint or args.only:
            settings["2:4 + lut4"] = "2:4+lut4"
        if args.only:
            settings = {args.only: settings[args.only]}
        for label, spec in settings.items():
            row = {"setting": label, "date": time.strftime("%Y-%m-%d")}
            for tool, jobs in (("milsparse", "all"), ("milsparse", "1"), ("coremltools", "-")):
                dst = folder / f"{tool}_{jobs}.mlpackage"
                row[f"{tool}_{jobs}" if tool == "milsparse" else tool] = _run(
                    tool, spec, src, dst, jobs
                )
            ours, serial = row["milsparse_all"], row["milsparse_1"]
            row["identical_bytes"] = ours.get("digest") == serial.get("digest") is not None
            result["rows"].append(row)
            print(json.dumps(row), file=sys.stderr)
        shutil.rmtree(src, ignore_errors=True)
        if args.huge_layers:
            need = 2.6 * args.huge_layers * args.width**2 * 2  # dense + output + scratch
            free = shutil.disk_usage(folder).free
            if free < need:
                result["huge"] = {
                    "skipped": f"{free / 2**30:.0f} GiB free, needs {need / 2**30:.0f}"
                }
            else:
                huge = folder / "huge.mlpackage"
                info = _build(huge, args.huge_layers, args.width)
                run = _run("milsparse", "2:4", huge, folder / "huge_out.mlpackage", "all")
                run.pop("digest", None)
                result["huge"] = {"model": info, "2:4": run}
                print(json.dumps(result["huge"]), file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.only:  # the other rows, and the large model, as they were
        previous = json.loads(Path(args.out).read_text())
        previous.pop("machine", None)
        rows = {r["setting"]: r for r in previous["rows"]}
        rows.update({r["setting"]: r for r in result["rows"]})
        result = {**previous, "rows": list(rows.values())}
    write(args.out, result)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*sys.argv[2:])))
    else:
        main()
