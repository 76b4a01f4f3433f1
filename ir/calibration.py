"""Calibration: what a weight's consumer sees of the data, accumulated while samples stream
through the reference interpreter.

Every weight is viewed as a matrix whose rows are its outputs and whose columns are the inputs
one output reads (`Columns`): linear `W[out, in]` (columns: `in`); conv `W[Cout, Cin/g, *k]`
(columns: `(Cin/g) * prod(k)` im2col patches, per group; dilation, stride, padding and groups
respected); a const operand of matmul (columns: the contracted axis). For each, `LayerStats`
accumulates, per group of columns:

- `sq[g, j]`: the sum of squares of input column j over every activation row (Wanda's
  `||X_j||^2`), in float64;
- `xtx[g, j, l]`: `X^T X` (SparseGPT's Hessian, up to a factor 2), only when asked for, in
  float32, as SparseGPT's own code keeps it (9 MiB for K = 1536, half of float64's);
- `rows`: how many activation rows were seen.

Memory is bounded by the statistics (`K` or `K^2` floats per weight), not by the activations of
all samples: each sample's activations are folded in and dropped. Collection uses the
interpreter's `observers` hook (`run_block`), one mechanism for every op.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from milsparse.ir import kernels_nn
from milsparse.ir.cursor import Cursor, top_level_op
from milsparse.ir.errors import ConfigError
from milsparse.ir.interpreter import StopRun
from milsparse.ir.samples import check_sample

__all__ = [
    "Columns",
    "LayerStats",
    "columns_of",
    "targets_of",
    "collect",
    "collect_at",
    "check_samples",
]


@dataclass(frozen=True)
class Columns:
    """How weight values map onto the (rows, columns) matrix the statistics describe.

    `input_name`: the consumer's operand that carries the activations; `weight_name`: the
    operand the weight feeds; `groups`: column groups (conv groups; 1 otherwise); `kind`:
    "linear", "conv", "matmul_y" (the weight is matmul's y) or "matmul_x"."""

    kind: str
    weight_name: str
    input_name: str
    groups: int = 1


def columns_of(op, weight_name: str) -> Columns | None:
    """The column view of the weight feeding `op.<weight_name>`, or None when the consumer has
    no calibration support (conv_transpose, or a matmul whose both operands are weights)."""
    if op.op_type == "linear" and weight_name == "weight":
        return Columns("linear", "weight", "x")
    if op.op_type == "conv" and weight_name == "weight":
        groups = op.groups.val if op.groups is not None else 1
        return Columns("conv", "weight", "x", int(groups))
    if op.op_type == "matmul" and weight_name in ("x", "y"):
        other = "y" if weight_name == "x" else "x"
        return Columns(f"matmul_{weight_name}", weight_name, other)
    return None


def targets_of(name: str, uses) -> dict | None:
    """`collect`'s targets for the weight `name` read through `uses` (graph Uses): id of each
    consumer -> (name, Columns); None when a consumer has no calibration support."""
    targets = {}
    for use in uses:
        columns = columns_of(use.op, use.input_name)
        if columns is None:
            return None
        targets[id(use.op)] = (name, columns)
    return targets


# Columns of X^T X updated per product while folding in a sample.
_XTX_PANEL = 256


@dataclass
class LayerStats:
    """Accumulated statistics of one weight's input columns (see the module docstring)."""

    columns: Columns
    with_xtx: bool
    sq: np.ndarray | None = None
    xtx: np.ndarray | None = None
    rows: int = 0
    samples: int = field(default=0)

    def add(self, x: np.ndarray, where: str = "activations") -> None:
        """Fold in activation rows `x` [groups, N, K]. Non-finite rows, or an `X^T X` that
        overflows float32, are a ConfigError starting with `where` (the weight and sample):
        the criteria would rank weights by NaN."""
        x = np.asarray(x, dtype=np.float32)
        sq = np.einsum("gnk,gnk->gk", x, x, dtype=np.float64)
        if not np.isfinite(sq).all():  # float32 squares fit float64: only inf or nan gets here
            raise ConfigError(
                f"{where}: the activations reaching it are not finite (inf or nan): the model "
                "overflows on this sample (fp16 holds values up to 65504); calibrate on inputs "
                "like the ones the model meets in use"
            )
        if self.sq is None:
            self.sq = sq
        else:
            self.sq += sq
        if self.with_xtx:
            groups, _, k = x.shape
            if self.xtx is None:
                self.xtx = np.zeros((groups, k, k), np.float32)
            for g in range(groups):  # a panel of columns at a time: no second K x K array
                for c in range(0, k, _XTX_PANEL):
                    e = min(c + _XTX_PANEL, k)
                    self.xtx[g][:, c:e] += x[g].T @ x[g][:, c:e]
                    if not np.isfinite(self.xtx[g][:, c:e]).all():
                        raise ConfigError(
                            f"{where}: X^T X of the activations reaching it overflows float32 "
                            f"(activations up to {float(np.abs(x).max()):.3g}); calibrate on "
                            "inputs of the scale the model meets in use"
                        )
        self.rows += x.shape[1]

    def wanda_scale(self, weight_shape: tuple[int, ...], weight_axes: tuple[int, int]):
        """sqrt(sq / rows) laid out to multiply a weight of `weight_shape` elementwise."""
        norm = np.sqrt(self.sq / max(self.rows, 1))
        return self.expand(norm, weight_shape, weight_axes)

    def expand(self, per_column: np.ndarray, shape, axes) -> np.ndarray:
        """A per-column array [groups, K] broadcast onto the weight's own layout."""
        kind = self.columns.kind
        if kind == "linear":
            return per_column[0][None, :]
        if kind == "conv":
            cout, cg = shape[0], shape[1]
            groups = self.columns.groups
            cols = per_column.reshape(groups, 1, cg, *shape[2:])
            return np.broadcast_to(cols, (groups, cout // groups, cg, *shape[2:])).reshape(shape)
        in_axis = axes[0]  # matmul: the contracted axis of the weight
        view = [1] * len(shape)
        view[in_axis] = shape[in_axis]
        return per_column[0].reshape(view)


def _activation_rows(op, columns: Columns, values: Mapping) -> np.ndarray:
    """[groups, N, K]: the rows of input columns this call of `op` feeds its weight."""
    x = np.asarray(values[columns.input_name], dtype=np.float32)
    kind = columns.kind
    if kind == "linear":
        return x.reshape(1, -1, x.shape[-1])
    if kind == "matmul_y":  # x @ y: rows of x (after its transpose) meet the weight's K axis
        if bool(kernels_nn._scalar(values.get("transpose_x"), False)):
            x = np.swapaxes(x, -1, -2)
        return x.reshape(1, -1, x.shape[-1])
    if kind == "matmul_x":  # x @ y with the weight x [M, K]: the columns of y are the rows
        y = x
        if bool(kernels_nn._scalar(values.get("transpose_y"), False)):
            y = np.swapaxes(y, -1, -2)
        return np.swapaxes(y, -1, -2).reshape(1, -1, y.shape[-2])
    # conv: im2col patches per group, columns ordered like the weight's (Cin/g, *k)
    w = values[columns.weight_name]
    nd = x.ndim - 2
    strides = kernels_nn._ints(values, "strides", [1] * nd)
    dilations = kernels_nn._ints(values, "dilations", [1] * nd)
    kernel = list(np.shape(w)[2:])
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    pads = kernels_nn._pads(values, x.shape[2:], effective, strides)
    out_sizes = [
        (size + b + e - k) // s + 1
        for size, (b, e), k, s in zip(x.shape[2:], pads, effective, strides, strict=True)
    ]
    padded = kernels_nn._pad_constant(x, pads)
    n, c = x.shape[:2]
    taps = int(np.prod(kernel))
    cols = np.empty((n, c, taps, *out_sizes), np.float32)
    for tap, offset in enumerate(np.ndindex(*kernel)):
        cols[:, :, tap] = padded[kernels_nn._tap_index(offset, dilations, out_sizes, strides)]
    groups = columns.groups
    cols = cols.reshape(n, groups, (c // groups) * taps, -1)  # N, G, K, P
    return np.moveaxis(cols, 1, 0).transpose(0, 1, 3, 2).reshape(groups, -1, cols.shape[2])


def check_samples(prog, samples: list[dict], function: str = "main") -> list[dict]:
    """Calibration samples as arrays, once each meets `samples.check_sample` with finite
    floats (statistics of inf or nan rank nothing). ConfigError naming the sample and input."""
    if not samples:
        raise ConfigError("calibration needs at least one sample")
    func = prog.functions[function]
    return [
        check_sample(func, sample, f"calibration sample {i}", finite=True)
        for i, sample in enumerate(samples)
    ]


def _observers(
    targets: Mapping[int, tuple[str, Columns]], with_xtx: bool, cursor: Cursor, stop_at=None
):
    stats: dict[str, LayerStats] = {}
    observers = {}
    for op_id, (name, columns) in targets.items():
        layer = stats.setdefault(name, LayerStats(columns, with_xtx))

        def observe(op, values, layer=layer, op_id=op_id, name=name):
            where = f"weight {name!r}, calibration sample {cursor.current_sample}"
            layer.add(_activation_rows(op, layer.columns, values), where)
            if op_id == stop_at:
                raise StopRun

        observers[op_id] = observe
    return stats, observers


def collect(
    prog,
    samples: list[dict],
    targets: Mapping[int, tuple[str, Columns]],
    *,
    with_xtx: bool,
    function: str = "main",
    progress=None,
) -> dict[str, LayerStats]:
    """Run `samples` through `function` once and accumulate the statistics of each target:
    `targets` maps id(consumer op) -> (weight name, Columns). The samples go through together
    (an interpreter `Cursor`), so decoded weights are held a stretch at a time.
    `progress(done, total)` is called as the run goes."""
    cursor = Cursor(prog, samples, function)
    stats, observers = _observers(targets, with_xtx, cursor)
    cursor.advance(observers=observers, progress=progress)
    for layer in stats.values():
        layer.samples = len(cursor)
    return stats


def collect_at(
    cursor: Cursor,
    targets: Mapping[int, tuple[str, Columns]],
    consumers: list,
    *,
    with_xtx: bool,
    progress=None,
) -> dict[str, LayerStats]:
    """Sequential calibration: move `cursor` up to the first of `consumers` (the ops in
    `targets`, none reached yet), running the program as it is now, and accumulate their
    statistics from a probe that leaves the cursor there."""
    func = cursor.prog.functions[cursor.function]
    order = {id(op): i for i, op in enumerate(func.operations)}
    tops = [top_level_op(op, func) for op in consumers]
    first = min(tops, key=lambda op: order[id(op)])
    last = max(range(len(consumers)), key=lambda i: order[id(tops[i])])
    # the last consumer, when it is a top-level op itself, ends each sample's probe
    stop_at = id(consumers[last]) if tops[last] is consumers[last] else None
    stats, observers = _observers(targets, with_xtx, cursor, stop_at)
    cursor.advance(until=first, progress=progress)
    cursor.probe(consumers, observers)
    for layer in stats.values():
        layer.samples = len(cursor)
    return stats
