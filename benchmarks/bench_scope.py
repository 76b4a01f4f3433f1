"""Magnitude pruning of a batchnorm-folded CNN: one ranking per tensor against one per channel.

    python benchmarks/bench_scope.py [--samples 8] [--out benchmarks/results/scope.json]

`ct.convert` folds each batchnorm into the conv before it: output channel c of the weight is
multiplied by gamma_c / sqrt(var_c + eps), so channels differ in scale by orders of magnitude.
Ranking |w| over the whole tensor (`unstructured:S`, scope "tensor") then prunes the
low-scale channels away whole; ranking each output channel on its own
(`unstructured@channel:S`, scope "channel") prunes every channel to S.

The model is `fixtures.torch_models.MobileNetV2Like` (MobileNetV2's layout, 3.5M parameters,
224x224; heavy-tailed conv weights and batchnorm statistics spread like a trained network's),
converted at fp32 for iOS18. For each sparsity and scope: `milsparse.compress`, then
`milsparse.verify()` against the dense model on `--samples` generated images, reporting the
logits' cosine and SNR, and the fraction of output channels left entirely zero. Measured in
one run; nothing is hard-coded.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _results  # benchmarks/_results.py, beside this script
import coremltools as ct
import numpy as np
import torch
from milsparse.fixtures import torch_models

import milsparse as ms
from milsparse.metrics import Tolerances

SPARSITIES = (0.3, 0.5)
SCOPES = {"tensor": "unstructured:{s}", "channel": "unstructured@channel:{s}"}


def _convert():
    torch.manual_seed(0)
    module = torch_models.MobileNetV2Like().eval()
    x = torch.zeros(1, 3, 224, 224)
    return ct.convert(
        torch.jit.trace(module, x),
        inputs=[ct.TensorType(name="x", shape=x.shape)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )


def _dead_channels(model) -> float:
    """Fraction of conv output channels whose weights are all zero."""
    prog = ms.load_program(model)
    from milsparse.ir.interpreter import static_values

    dead = total = 0
    for op in prog.functions["main"].operations:
        if op.op_type == "conv" and op.weight.op.op_type.startswith("constexpr_"):
            (w,) = static_values(op.weight.op)
            per_channel = np.abs(w.reshape(w.shape[0], -1)).sum(axis=1)
            dead += int(np.count_nonzero(per_channel == 0))
            total += w.shape[0]
    return dead / total if total else 0.0


def run(samples: int) -> list[dict]:
    dense = _convert()
    rows = []
    for sparsity in SPARSITIES:
        for scope, template in SCOPES.items():
            spec = template.format(s=sparsity)
            pruned, report = ms.compress_with_report(dense, spec)
            check = ms.verify(dense, pruned, samples=samples, tolerances=Tolerances(None, None))
            (logits,) = check.outputs
            row = {
                "spec": spec,
                "scope": scope,
                "sparsity": sparsity,
                "weights_pruned": len(report.compressed),
                "logits_cosine": logits.cosine,
                "logits_snr_db": logits.snr_db,
                "dead_output_channels": _dead_channels(pruned),
            }
            rows.append(row)
            print(
                f"{spec:28s} cosine {row['logits_cosine']:.4f}  SNR {row['logits_snr_db']:6.2f} dB"
                f"  all-zero output channels {100 * row['dead_output_channels']:5.1f}%",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scope.json"))
    args = parser.parse_args()
    rows = run(args.samples)
    model = "MobileNetV2Like (3.5M parameters, 224x224, batchnorm folded by ct.convert), fp32"
    _results.write(args.out, {"model": model, "samples": args.samples, "rows": rows})


if __name__ == "__main__":
    main()
