"""Data-aware pruning on a trained model: held-out accuracy after magnitude, Wanda and SparseGPT.

    pip install -e ".[bench]"   # scikit-learn, for its bundled digits data set (no download)
    python benchmarks/bench_data_aware.py [--out benchmarks/results/data_aware.json]

A small CNN (three 3x3 convs with batchnorm, two linear layers; 140K weights) is trained in
this script, seeded, for a few seconds on scikit-learn's bundled 8x8 digits (1,437 training
images, 360 held out), converted with `ct.convert` (fp32, iOS18, batches of 40 images), and
pruned by milsparse with each criterion at several patterns, with uniform and with global
(per-layer, from measured sensitivity) allocation, and the joint chains 2:4 + lut4 and 2:4 +
int4 with tables and ranges fitted plainly or weighted by activation energy; calibration: 8
batches of training images.
Accuracy and mean cross-entropy are measured on the held-out images through milsparse's
reference interpreter.
Also a 2-layer transformer encoder (d 64, 4 heads, ff 256; 16-token sequences) trained in the
script on generated sequences, whose label is the token the first token points to, held-out
accuracy on 2,000 generated sequences; and the time of SparseGPT at 50% on a 6-layer encoder
of BERT-small shape (d 384, 12 heads, ff 1536, sequence 32) with 32 calibration sequences,
calibration included, and its peak memory above imports (each in a fresh process).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _results import write  # noqa: E402

PATTERNS = ["unstructured:0.5", "unstructured:0.75", "2:4"]
ALLOCATED = ["unstructured:0.75", "unstructured:0.85"]  # global allocation vs uniform
CRITERIA = ["magnitude", "wanda", "sparsegpt"]
BATCH = 40


def _train_digits(seed: int = 0):
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1437], y[:1437], x[1437:], y[1437:]
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(40):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    return model, (x_train, y_train, x_test, y_test)


def _held_out(model, name: str, x, y, batch: int) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on held-out batches of input `name`, through
    the interpreter (a short last batch is left out: the model's batch size is fixed)."""
    import numpy as np
    from milsparse.ir.interpreter import evaluate_program

    import milsparse as ms

    prog = ms.load_program(model)
    correct, loss, count = 0, 0.0, 0
    cache: dict = {}
    for i in range(0, len(x) - len(x) % batch, batch):
        out = next(iter(evaluate_program(prog, {name: x[i : i + batch]}, cache=cache).values()))
        logits = out.astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        labels = y[i : i + batch]
        loss -= float(log_p[np.arange(len(labels)), labels].sum())
        correct += int((out.argmax(-1) == labels).sum())
        count += len(labels)
    return correct / count, loss / count


def _criteria_rows(path, settings, calib, evaluate, tag: str) -> list[dict]:
    """The dense row, then one row per (pattern, criterion, allocate, extra config) setting:
    held-out accuracy and loss (`evaluate(model)`), prune seconds, stored bytes."""
    import milsparse as ms

    acc, loss = evaluate(path)
    rows = [{"pattern": "dense", "criterion": "-", "allocate": "-", "accuracy": acc,
             "loss": loss, "seconds": 0.0}]  # fmt: skip
    for pattern, criterion, allocate, extra in settings:
        config = {"spec": pattern, "criterion": criterion, "min_size": 2048,
                  "allocate": allocate, **extra}  # fmt: skip
        needs = criterion != "magnitude" or allocate != "uniform"
        t0 = time.perf_counter()
        pruned, report = ms.compress_with_report(path, config, calibration=calib if needs else None)
        seconds = time.perf_counter() - t0
        acc, loss = evaluate(pruned)
        label = criterion + "".join(f" ({k} {v})" for k, v in extra.items())
        rows.append({"pattern": pattern, "criterion": label, "allocate": allocate,
                     "accuracy": acc, "loss": loss, "seconds": seconds,
                     "stored_bytes": report.totals()["stored_bytes"],
                     "sparsities": {d.name: d.sparsity for d in report.compressed}})  # fmt: skip
        print(f"{tag} {pattern} {label} {allocate}: {acc:.4f}", file=sys.stderr, flush=True)
    return rows


def _save_converted(traced, name: str, shape, dtype, path: Path, fp16: bool = False) -> Path:
    """`ct.convert` a traced module with one input (iOS18; fp32 compute, or fp16) and save it."""
    import coremltools as ct

    model = ct.convert(
        traced,
        inputs=[ct.TensorType(name=name, shape=shape, dtype=dtype)],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
        skip_model_load=True,
    )
    model.save(str(path))
    return path


def digits_rows(folder: Path) -> list[dict]:
    import numpy as np
    import torch

    import milsparse as ms

    model, (x_train, y_train, x_test, y_test) = _train_digits()
    traced = torch.jit.trace(model, torch.zeros(BATCH, 1, 8, 8))
    path = _save_converted(traced, "x", (BATCH, 1, 8, 8), np.float32, folder / "digits.mlpackage")
    calib = [{"x": x_train[i : i + BATCH]} for i in range(0, 8 * BATCH, BATCH)]
    uniform = list(dict.fromkeys(PATTERNS + ALLOCATED))
    settings = [(p, c, "uniform", {}) for p in uniform for c in CRITERIA]
    settings += [(p, c, "global", {}) for p in ALLOCATED for c in CRITERIA]

    def evaluate(model):
        return _held_out(model, "x", x_test, y_test, BATCH)

    rows = _criteria_rows(path, settings, calib, evaluate, "digits")
    # the joint chains, their tables and ranges fitted plainly or weighted by activation energy
    for second in ("lut4", "int4"):
        for weighted in (False, True):
            recipe = ms.Recipe(
                [{"prune": {"spec": "2:4", "min_size": 2048}},
                 {ms.recipe.kind_of_text(second): {"spec": second, "min_size": 2048}}],
                target="ios18",
            )  # fmt: skip
            t0 = time.perf_counter()
            pruned, report = ms.compress_with_report(
                path, recipe, calibration=calib if weighted else None
            )
            seconds = time.perf_counter() - t0
            acc, loss = evaluate(pruned)
            rows.append({"pattern": f"2:4 + {second}", "criterion": "magnitude",
                         "allocate": "activation-weighted" if weighted else "plain fit",
                         "accuracy": acc, "loss": loss, "seconds": seconds,
                         "stored_bytes": report.totals()["stored_bytes"]})  # fmt: skip
    return rows


SEQ, VOCAB, SEQ_BATCH = 16, 16, 50


def _train_pointer_transformer(seed: int = 0):
    """A 2-layer encoder (d 64, 4 heads, ff 256) trained on generated sequences: the label is
    the token at the position the first token points to (attention must find it)."""
    import torch
    from torch import nn

    class Pointer(nn.Module):
        def __init__(self, d=64, layers=2):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, d)
            self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.1)
            layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(d, VOCAB)

        def forward(self, ids):
            return self.head(self.enc(self.emb(ids) + self.pos)[:, 0])

    def batch(n, generator):
        x = torch.randint(0, VOCAB, (n, SEQ), generator=generator)
        return x, x[torch.arange(n), 1 + x[:, 0] % (SEQ - 1)]

    torch.manual_seed(seed)
    model = Pointer()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(400):
        x, y = batch(128, generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    calib = batch(8 * SEQ_BATCH, torch.Generator().manual_seed(seed + 1))[0].numpy()
    x_test, y_test = batch(40 * SEQ_BATCH, torch.Generator().manual_seed(seed + 2))
    return model, calib.astype("int32"), x_test.numpy().astype("int32"), y_test.numpy()


def transformer_rows(folder: Path) -> list[dict]:
    import numpy as np
    import torch

    model, calib_ids, x_test, y_test = _train_pointer_transformer()
    traced = torch.jit.trace(model, torch.zeros(SEQ_BATCH, SEQ, dtype=torch.int64),
                             check_trace=False)  # fmt: skip
    path = _save_converted(traced, "ids", (SEQ_BATCH, SEQ), np.int32, folder / "pointer.mlpackage")
    calib = [{"ids": calib_ids[i : i + SEQ_BATCH]} for i in range(0, len(calib_ids), SEQ_BATCH)]
    settings = [(p, c, "uniform", {}) for p in TRANSFORMER_PATTERNS for c in CRITERIA]
    settings += [("unstructured:0.75", c, "global", {}) for c in CRITERIA]
    # this network's first layer sees 256 distinct input vectors: more dampening
    settings += [("unstructured:0.75", "sparsegpt", "uniform", {"dampening": 0.1})]

    def evaluate(model):
        return _held_out(model, "ids", x_test, y_test, SEQ_BATCH)

    return _criteria_rows(path, settings, calib, evaluate, "transformer")


TRANSFORMER_PATTERNS = ["unstructured:0.5", "2:4", "unstructured:0.75"]


_BERT_WORKER = """
import sys, time, json, numpy as np
import milsparse as ms
# milsparse is lazy: coremltools and torch load here, before the baseline
import milsparse.api  # noqa: F401
src, criterion = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
calib = [{"x": rng.standard_normal((1, 32, 384)).astype(np.float32)} for _ in range(32)]
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
base = status("VmRSS")
t0 = time.perf_counter()
ms.compress(src, {"spec": "unstructured:0.5", "criterion": criterion}, calibration=calib,
            output=src + "." + criterion + ".mlpackage")
print(json.dumps({"seconds": time.perf_counter() - t0, "peak": status("VmHWM") - base}))
"""


def bert_rows(folder: Path) -> list[dict]:
    import numpy as np
    import torch
    from milsparse.fixtures import torch_models
    from milsparse.fixtures.files import tree_size

    torch.manual_seed(0)
    module = torch_models.TinyEncoder(
        d_model=384, heads=12, d_ff=1536, layers=6, activation="gelu"
    ).eval()
    with torch.no_grad():  # nn.TransformerEncoder copies one layer: give each its own weights
        for layer in module.encoder.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    torch.nn.init.xavier_uniform_(p)
    shape = (1, 32, 384)
    traced = torch.jit.trace(module, torch.zeros(shape), check_trace=False)
    src = _save_converted(
        traced, "x", shape, np.float32, folder / "bert_small.mlpackage", fp16=True
    )
    rows = []
    for criterion in ("wanda", "sparsegpt"):
        proc = subprocess.run(
            [sys.executable, "-c", _BERT_WORKER, str(src), criterion],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"criterion": criterion, "model_size": tree_size(src), **result})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).with_name("results") / "data_aware.json")
    )
    args = parser.parse_args()
    try:
        import sklearn  # noqa: F401
    except ImportError:
        sys.exit("the digits data set comes with scikit-learn: pip install -e '.[bench]'")
    with tempfile.TemporaryDirectory(prefix="milsparse-bench-") as tmp:
        result = {
            "digits": digits_rows(Path(tmp)),
            "transformer": transformer_rows(Path(tmp)),
            "bert_small": bert_rows(Path(tmp)),
        }
    write(args.out, result)
    for r in result["digits"]:
        print(f"{r['pattern']:>18} {r['criterion']:>10} {r['allocate']:>8} "
              f"{r['accuracy']:.4f} {r['loss']:.4f}")  # fmt: skip
    for r in result["transformer"]:
        print(f"transformer {r['pattern']:>18} {r['criterion']:>10} {r['allocate']:>8} "
              f"{r['accuracy']:.4f} {r['loss']:.4f}")  # fmt: skip
    for r in result["bert_small"]:
        print(f"BERT-small {r['criterion']}: {r['seconds']:.1f} s, peak "
              f"{r['peak'] / 2**20:.0f} MiB, model {r['model_size'] / 2**20:.1f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
