"""Joint compression, milsparse vs coremltools, side by side in one run: quality and speed.

    pip install -e ".[bench]"   # scikit-learn: coremltools' k-means needs it; milsparse does not
    python benchmarks/bench_joint.py [--params 100e6] [--runs 1] [--out FILE.json]

Quality: the weights of a 6-layer transformer (d 384, ff 1536; 10.6M fp16 weights drawn like
trained ones: Student-t values, lognormal channel gains, outlier channels) pruned 2:4 once by
milsparse; then the same pruned package palettized jointly at 2 and 4 bits by milsparse
(`ms.compress(pruned, "lutN")`) and by coremltools (`palettize_weights(...,
OpPalettizerConfig(nbits=N, mode="kmeans"), joint_compression=True)`). Reported: the relative
reconstruction error of the kept values, sum((q - w)^2) / sum(w^2) over the nonzeros of every
weight, and the package sizes.

Speed: a generated package of square 4096x4096 fp16 linear layers (`--params`, default
100.7M weights, drawn like trained ones); each tool in fresh processes, load + compress + save:
4-bit k-means palettization of the dense package; the same after 2:4 pruning (the joint form;
the pruned input made once by milsparse, not timed); int8 per-channel linear quantization.
Reported: wall time (median of `--runs`), peak RSS above the RSS after importing the tool,
output size. Ratios are computed within this run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write  # noqa: E402
from bench_prune import _peak_bytes, _rss_bytes, run_workers  # noqa: E402

SPEED = {
    "4-bit k-means": ("dense", "lut4"),
    "2:4, then 4-bit k-means (joint)": ("pruned", "lut4"),
    "int8 per channel": ("dense", "int8"),
}


def worker(tool: str, spec: str, src: str, dst: str, joint: bool) -> dict:
    if tool == "milsparse":
        import milsparse as ms
        import milsparse.api  # noqa: F401  (coremltools loads on first use: import it
        # before the baseline, as the other tool's worker does)

        baseline = _rss_bytes()
        t0 = time.perf_counter()
        ms.compress(src, spec, output=dst)
    else:
        import coremltools as ct
        import coremltools.optimize.coreml as cto

        baseline = _rss_bytes()
        t0 = time.perf_counter()
        model = ct.models.MLModel(src, skip_model_load=True)
        if spec.startswith("lut"):
            op = cto.OpPalettizerConfig(nbits=int(spec[3:]), mode="kmeans")
            out = cto.palettize_weights(
                model, cto.OptimizationConfig(global_config=op), joint_compression=joint
            )
        else:
            op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
            out = cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op))
        out.save(dst)
    return {"seconds": time.perf_counter() - t0, "peak_above_import": _peak_bytes() - baseline}


def _kept_error(pruned: Path, palettized) -> tuple[float, dict]:
    """Relative error of the kept values over every pruned weight, and the output's formats."""
    import numpy as np
    from milsparse.ir.chain import weight_chain

    import milsparse as ms

    before = {
        op.name: weight_chain(op)
        for op in ms.load_program(pruned).functions["main"].operations
        if weight_chain(op) is not None
    }
    err = energy = 0.0
    labels: dict[str, int] = {}
    for op in ms.load_program(palettized).functions["main"].operations:
        chain = weight_chain(op)
        if chain is None or op.name not in before or before[op.name].label != "sparse":
            continue
        labels[chain.label] = labels.get(chain.label, 0) + 1
        w = before[op.name].decode().astype(np.float64)
        q = chain.decode().astype(np.float64)
        kept = w != 0
        err += float(((q[kept] - w[kept]) ** 2).sum())
        energy += float((w[kept] ** 2).sum())
    return err / energy, labels


def quality(folder: Path) -> list[dict]:
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from milsparse.fixtures.files import tree_size
    from milsparse.fixtures.programs import program_to_mlmodel, transformer_weights

    import milsparse as ms

    dense = folder / "transformer.mlpackage"
    program_to_mlmodel(transformer_weights()).save(str(dense))
    pruned = folder / "transformer_2of4.mlpackage"
    ms.compress(dense, "2:4", output=pruned)
    rows = []
    for nbits in (2, 4):
        ours = folder / f"ms_lut{nbits}.mlpackage"
        theirs = folder / f"ct_lut{nbits}.mlpackage"
        ms.compress(pruned, f"lut{nbits}", output=ours)
        op = cto.OpPalettizerConfig(nbits=nbits, mode="kmeans")
        cto.palettize_weights(
            ct.models.MLModel(str(pruned), skip_model_load=True),
            cto.OptimizationConfig(global_config=op),
            joint_compression=True,
        ).save(str(theirs))
        ms_err, ms_forms = _kept_error(pruned, ours)
        ct_err, ct_forms = _kept_error(pruned, theirs)
        rows.append(
            {
                "nbits": nbits,
                "milsparse_rel_error": ms_err,
                "coremltools_rel_error": ct_err,
                "milsparse_size": tree_size(ours),
                "coremltools_size": tree_size(theirs),
                "milsparse_forms": ms_forms,
                "coremltools_forms": ct_forms,
            }
        )
    return rows


def speed(folder: Path, params: float, runs: int, width: int = 4096) -> list[dict]:
    from milsparse.fixtures.files import tree_size
    from milsparse.fixtures.programs import big_linear_stack, program_to_mlmodel

    import milsparse as ms

    dense = folder / "big.mlpackage"
    program_to_mlmodel(big_linear_stack(int(params), width=width, distribution="trained")).save(
        str(dense)
    )
    pruned = folder / "big_2of4.mlpackage"
    ms.compress(dense, "2:4", output=pruned)
    dense_size = tree_size(dense)
    weights = sum(r.num_elements for r in ms.inspect_model(dense).rows if len(r.shape) > 1)
    rows = []
    for label, (source, spec) in SPEED.items():
        src = dense if source == "dense" else pruned
        row = {"setting": label, "weights": weights, "dense_size": dense_size}
        for tool in ("milsparse", "coremltools"):
            dst = folder / f"{tool}_{spec}_{source}.mlpackage"
            print(f"[{label}] {tool} ...", file=sys.stderr, flush=True)
            joint = source == "pruned"
            run = run_workers(__file__, (tool, spec, src, dst, joint), dst, runs)
            if "error" not in run:
                run["size"] = tree_size(dst)
                forms = {r.format for r in ms.inspect_model(dst).rows if len(r.shape) > 1}
                run["forms"] = sorted(forms)
                shutil.rmtree(dst, ignore_errors=True)
            row[tool] = run
        rows.append(row)
    return rows


def _tables(result) -> str:
    from milsparse.report import format_table, human_bytes

    q = result["quality"]
    quality_rows = [
        [
            f"{r['nbits']}-bit",
            f"{r['milsparse_rel_error']:.5f}",
            f"{r['coremltools_rel_error']:.5f}",
            f"{r['coremltools_rel_error'] / r['milsparse_rel_error']:.2f}x",
            human_bytes(r["milsparse_size"]),
            human_bytes(r["coremltools_size"]),
            f"{100 * (r['milsparse_size'] / r['coremltools_size'] - 1):+.2f}%",
        ]
        for r in q
    ]
    speed_rows = []
    for r in result["speed"]:
        m, c = r["milsparse"], r["coremltools"]
        ok = "error" not in m and "error" not in c
        speed_rows.append(
            [
                r["setting"],
                f"{m['seconds']:.1f}" if "error" not in m else m["error"],
                f"{c['seconds']:.1f}" if "error" not in c else c["error"],
                f"{c['seconds'] / m['seconds']:.1f}x" if ok else "-",
                human_bytes(m.get("peak_above_import", 0)),
                human_bytes(c.get("peak_above_import", 0)) if "error" not in c else "-",
                f"{m.get('peak_above_import', 0) / r['dense_size']:.2f}",
                human_bytes(m.get("size", 0)),
                human_bytes(c.get("size", 0)) if "error" not in c else "-",
            ]
        )
    return (
        format_table(
            [
                "palettization of 2:4",
                "milsparse error",
                "coremltools error",
                "ratio",
                "milsparse size",
                "coremltools size",
                "size difference",
            ],
            quality_rows,
        )  # fmt: skip
        + "\n\n"
        + format_table(
            [
                "setting",
                "milsparse s",
                "coremltools s",
                "speedup",
                "milsparse peak",
                "coremltools peak",
                "milsparse peak / dense",
                "milsparse size",
                "coremltools size",
            ],
            speed_rows,
        )  # fmt: skip
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="weights of the speed model")
    parser.add_argument("--runs", type=int, default=1, help="processes per tool and setting")
    parser.add_argument("--skip-speed", action="store_true", help="quality only")
    parser.add_argument("--width", type=int, default=4096, help="rows and columns of each layer")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "joint.json"))
    args = parser.parse_args()
    try:
        import sklearn  # noqa: F401
    except ImportError:
        sys.exit("coremltools' k-means needs scikit-learn: pip install -e '.[bench]'")

    folder = Path(tempfile.mkdtemp(prefix="milsparse-bench-"))
    try:
        result = {"quality": quality(folder)}
        result["speed"] = (
            [] if args.skip_speed else speed(folder, args.params, args.runs, args.width)
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    write(args.out, result)
    print(_tables(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        tool, spec, src, dst, joint = sys.argv[2:7]
        print(json.dumps(worker(tool, spec, src, dst, joint == "True")))
    else:
        main()
