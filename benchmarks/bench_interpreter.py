"""The numpy reference interpreter against torch eager, on the same inputs, in one run.

    python benchmarks/bench_interpreter.py [--repeats 20] [--out FILE] [--cases TEXT]

(default FILE: benchmarks/results/interpreter.json)

For the transformer encoder and the CNN of `milsparse.fixtures.torch_models`, at the fixture
size and at a larger size, the module is converted with `ct.convert` (fp32 and fp16 precision)
and one input is run `--repeats` times through each of

- torch eager (`torch.no_grad()`, the module in eval mode, torch's default threads), and
- `milsparse.evaluate` on the converted program, with a shared constexpr cache (what `verify`
  does across samples), after one warm-up call,

in alternating blocks of calls (`_paired_medians`), so that both are timed under the same load.

Reported: the median wall time per call of each, the ratio interpreter / torch (the goal is at
most 2 on the BERT-small encoder and the MobileNetV2-shaped CNN), and how far the
interpreter's output is from torch's (max relative error for fp32,
cosine for fp16), so a fast but wrong kernel cannot hide. Ratios are computed within this run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import _results  # benchmarks/_results.py, beside this script
import coremltools as ct
import numpy as np
import torch
from milsparse.fixtures import torch_models
from milsparse.ir.interpreter import evaluate_program

CASES = {
    "transformer, fixture (d 64, 2 layers, seq 8)": (
        lambda: torch_models.TinyEncoder(),
        (1, 8, 64),
    ),
    "transformer (d 256, 8 heads, ff 1024, 4 layers, seq 128)": (
        lambda: torch_models.TinyEncoder(d_model=256, heads=8, d_ff=1024, layers=4),
        (1, 128, 256),
    ),
    "cnn, fixture (3-32-64 ch, 16x16)": (lambda: torch_models.ConvBNNet(), (1, 3, 16, 16)),
    "cnn (3-64-128 ch, 64x64)": (
        lambda: torch_models.ConvBNNet(c=(3, 64, 128), size=64),
        (1, 3, 64, 64),
    ),
    # the shapes the interpreter is held to (at most 2x torch eager):
    "BERT-small encoder (d 384, 12 heads, ff 1536, erf GELU, 6 layers; batch 8, seq 32)": (
        lambda: torch_models.TinyEncoder(
            d_model=384, heads=12, d_ff=1536, layers=6, activation="gelu"
        ),
        (8, 32, 384),
    ),
    "MobileNetV2-shaped CNN (depthwise + pointwise, batchnorm; 224x224)": (
        lambda: torch_models.MobileNetV2Like(),
        (1, 3, 224, 224),
    ),
}
GOAL = 2.0
PRECISIONS = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}


def _paired_medians(first, second, repeats: int, block: int = 5) -> tuple[float, float]:
    """Median seconds per call of `first` and `second`, timed in alternating blocks of `block`
    calls so that both see the same machine (on a shared 2-core VM, torch's own time moved by
    1.5x between runs). The first call of each block is not counted: right after a switch the
    other runtime's worker threads (OpenMP for torch, OpenBLAS for numpy) still spin and slow
    it, by 2-3x when single calls alternate."""
    a, b = [], []
    while len(a) < repeats:
        for fn, times in ((first, a), (second, b)):
            fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def _convert(module, shape, precision):
    traced = torch.jit.trace(module, torch.zeros(shape), check_trace=False)
    return ct.convert(
        traced,
        inputs=[ct.TensorType(name="x", shape=shape, dtype=np.float32)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=PRECISIONS[precision],
        skip_model_load=True,
    )


def run(repeats: int, only: str | None = None) -> list[dict]:
    rows = []
    for case, (make, shape) in CASES.items():
        if only and only.lower() not in case.lower():
            continue
        torch.manual_seed(0)
        module = make().eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = module(x).numpy()

        def eager(module=module, x=x):
            with torch.no_grad():
                return module(x)

        for precision in PRECISIONS:
            prog = _convert(module, shape, precision)._mil_program
            cache: dict = {}
            feed = {"x": x.numpy()}
            (got,) = evaluate_program(prog, feed, cache=cache).values()
            torch_s, ours_s = _paired_medians(
                eager, lambda p=prog, c=cache, f=feed: evaluate_program(p, f, cache=c), repeats
            )
            got64, want64 = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
            row = {
                "case": case,
                "precision": precision,
                "ops": len(prog.functions["main"].operations),
                "torch_ms": torch_s * 1e3,
                "interpreter_ms": ours_s * 1e3,
                "ratio": ours_s / torch_s,
            }
            if precision == "fp32":
                row["max_rel_err"] = float(np.max(np.abs(got64 - want64)) / np.max(np.abs(want64)))
            else:
                row["cosine"] = float(
                    got64 @ want64 / (np.linalg.norm(got64) * np.linalg.norm(want64))
                )
            rows.append(row)
            print(
                f"{case[:58]:58s} {precision}  torch {row['torch_ms']:8.2f} ms  "
                f"interpreter {row['interpreter_ms']:8.2f} ms  ratio {row['ratio']:5.2f}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/interpreter.json"))
    parser.add_argument("--cases", metavar="TEXT", help="only the cases whose name contains TEXT")
    args = parser.parse_args()
    rows = run(args.repeats, args.cases)
    _results.write(args.out, {"repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
