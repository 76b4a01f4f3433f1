"""milsparse.compress vs coremltools' prune_weights on the same saved model, side by side.

    python benchmarks/bench_prune.py [--params 100e6] [--out benchmarks/results/prune.json]

For fp16 and fp32 copies of a generated program of square linear layers (>= 100M weights by
default), and for magnitude 0.5 and 2:4, each tool runs in its own fresh processes (so peak
memory is its own), `--runs` times: load the .mlpackage, prune, save. Reported per setting:

- wall time of load + prune + save (median of the runs);
- peak RSS above the RSS right after importing the tool (`VmHWM` minus `VmRSS`);
- output size on disk, and for milsparse the byte accounting's prediction of the weight file;
- sparsity actually reached over the weights that were meant to be pruned.

Ratios are computed within this one run; no numbers are hard-coded anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"magnitude 0.5": "unstructured:0.5", "2:4": "2:4"}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_bytes() -> int:
    return _status("VmRSS")


def _peak_bytes() -> int:
    # VmHWM is this process image's own high-water mark; ru_maxrss would carry the parent's
    # RSS over fork+exec, and the parent holds the generated models.
    return _status("VmHWM")


def worker(tool: str, spec: str, src: str, dst: str) -> dict:
    if tool == "milsparse":
        import milsparse as ms
        import milsparse.api  # noqa: F401  (coremltools loads on first use: import it
        # before the baseline, as the other tool's worker does)

        baseline = _rss_bytes()
        t0 = time.perf_counter()
        ms.compress(src, spec, output=dst)
        elapsed = time.perf_counter() - t0
    else:
        import coremltools as ct
        import coremltools.optimize as cto

        baseline = _rss_bytes()
        if spec == "2:4":
            op_config = cto.coreml.OpMagnitudePrunerConfig(n_m_ratio=(2, 4))
        else:
            op_config = cto.coreml.OpMagnitudePrunerConfig(
                target_sparsity=float(spec.split(":")[1])
            )
        t0 = time.perf_counter()
        mlmodel = ct.models.MLModel(src, skip_model_load=True)
        pruned = cto.coreml.prune_weights(
            mlmodel, cto.coreml.OptimizationConfig(global_config=op_config)
        )
        pruned.save(dst)
        elapsed = time.perf_counter() - t0
    return {"seconds": elapsed, "peak_above_import": _peak_bytes() - baseline}


def run_workers(script, args, dst, runs: int) -> dict:
    """Median time and largest peak over `runs` fresh processes of `script --worker *args`,
    each printing JSON with `seconds` and `peak_above_import` last, `dst` removed before each
    (disk and page-cache timing on a shared VM varies from run to run)."""
    samples = []
    for _ in range(runs):
        shutil.rmtree(dst, ignore_errors=True)
        cmd = [sys.executable, str(script), "--worker", *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
        samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    seconds = sorted(s["seconds"] for s in samples)
    return {
        "seconds": seconds[len(seconds) // 2],
        "seconds_all": seconds,
        "peak_above_import": max(s["peak_above_import"] for s in samples),
    }


def _measure_output(path: Path, names: set[str]) -> dict:
    import numpy as np
    from milsparse.fixtures.files import tree_size
    from milsparse.ir import formats

    import milsparse as ms

    prog = ms.load_program(path)
    zeros = total = 0
    for op in prog.functions["main"].operations:
        if op.op_type == "constexpr_sparse_to_dense":
            mask = op.mask.val
            n = int(np.prod(op.outputs[0].shape))
            ones = (
                int(np.unpackbits(mask).sum())
                if "shape" in op.inputs
                else int(np.count_nonzero(mask))
            )
            zeros, total = zeros + n - ones, total + n
        elif op.op_type == "const" and op.name in names:
            val = op.outputs[0].val
            zeros, total = zeros + int(val.size - np.count_nonzero(val)), total + val.size
    report = ms.inspect_model(path)
    weight_file = next(path.rglob("weight.bin"))
    predicted = formats.BLOB_FILE_HEADER_BYTES + report.totals()["stored_bytes"]
    return {
        "size_on_disk": tree_size(path),
        "weight_file": weight_file.stat().st_size,
        "predicted_weight_file": predicted,
        "sparsity_reached": zeros / total if total else 0.0,
    }


def _build_models(params: float, folder: Path, width: int = 4096) -> dict[str, Path]:
    import numpy as np
    from milsparse.fixtures.programs import big_linear_stack, program_to_mlmodel

    paths = {}
    for name, dtype in (("fp16", np.float16), ("fp32", np.float32)):
        path = folder / f"dense_{name}.mlpackage"
        program_to_mlmodel(big_linear_stack(int(params), width=width, dtype=dtype)).save(str(path))
        paths[name] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params", type=float, default=100e6, help="weights in the generated model"
    )
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "prune.json"))
    parser.add_argument("--runs", type=int, default=3, help="processes per tool and setting")
    parser.add_argument("--width", type=int, default=4096, help="rows and columns of each layer")
    args = parser.parse_args()

    import milsparse as ms
    from milsparse.report import format_table, human_bytes

    folder = Path(tempfile.mkdtemp(prefix="milsparse-bench-"))
    results = []
    try:
        models = _build_models(args.params, folder, args.width)
        for dtype, src in models.items():
            dense_size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
            weights = {
                r.name
                for r in ms.inspect_model(src).rows
                if r.num_elements >= 2048 and len(r.shape) > 1
            }
            elements = sum(r.num_elements for r in ms.inspect_model(src).rows if r.name in weights)
            for label, spec in SETTINGS.items():
                row = {
                    "dtype": dtype,
                    "setting": label,
                    "weights": elements,
                    "dense_size": dense_size,
                }
                for tool in ("milsparse", "coremltools"):
                    dst = folder / f"{tool}_{dtype}_{spec.replace(':', '_')}.mlpackage"
                    print(f"[{dtype} {label}] {tool} ...", file=sys.stderr, flush=True)
                    run = run_workers(__file__, (tool, spec, src, dst), dst, args.runs)
                    if "error" not in run:
                        run.update(_measure_output(dst, weights))
                        shutil.rmtree(dst, ignore_errors=True)
                    row[tool] = run
                results.append(row)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    table = []
    for r in results:
        m, c = r["milsparse"], r["coremltools"]
        ok = "error" not in m and "error" not in c
        table.append(
            [
                r["dtype"],
                r["setting"],
                f"{m.get('seconds', float('nan')):.1f}",
                f"{c.get('seconds', float('nan')):.1f}" if "error" not in c else "error",
                f"{c['seconds'] / m['seconds']:.1f}x" if ok else "-",
                human_bytes(m.get("peak_above_import", 0)),
                human_bytes(c.get("peak_above_import", 0)) if "error" not in c else "-",
                f"{m.get('peak_above_import', 0) / r['dense_size']:.2f}",
                human_bytes(m.get("size_on_disk", 0)),
                human_bytes(c.get("size_on_disk", 0)) if "error" not in c else "-",
                f"{m.get('sparsity_reached', 0):.4f}",
                f"{c.get('sparsity_reached', 0):.4f}" if "error" not in c else "-",
                f"{100 * (m['weight_file'] - m['predicted_weight_file']) / m['weight_file']:+.3f}%",
            ]
        )
    headers = [
        "dtype",
        "setting",
        "ms s",
        "ct s",
        "speedup",
        "ms peak",
        "ct peak",
        "ms peak/dense",
        "ms size",
        "ct size",
        "ms sparsity",
        "ct sparsity",
        "size vs accounting",
    ]
    print(format_table(headers, table))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"params": args.params, "results": results}, indent=2) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        os.environ.setdefault("TQDM_DISABLE", "1")
        print(json.dumps(worker(*sys.argv[2:6])))
    else:
        main()
