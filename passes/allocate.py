"""Per-layer sparsity from measured sensitivity (`allocate: global`).

For every selected weight, its sensitivity curve is measured on the calibration statistics: at
each sparsity of `GRID`, the criterion's mask (magnitude, or Wanda's scores for wanda and
sparsegpt) is applied and the layer's relative output error is computed exactly from `X^T X`:

    e(s) = tr(D H D^T) / tr(W H W^T),  D = W - W_pruned,  H = X^T X

(per group for grouped convs). No extra interpreter run is needed. SparseGPT's own update would
lower every point; the curves rank the layers, which is what the allocation needs.

`global_allocation` then gives each layer a sparsity so that the total number of zeros is
exactly the target (the spec's sparsity times the selected weights' elements) and the summed
relative error is as small as the curves allow: greedily, the next step goes to the layer whose
error grows least per weight removed (optimal for convex curves); the last step is cut to land
on the target. A layer goes no further than the grid's last point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import attrs
import numpy as np
from milsparse.ir import masks
from milsparse.ir.calibration import LayerStats
from milsparse.ir.errors import ConfigError
from milsparse.passes import data_aware

__all__ = ["GRID", "Curve", "sensitivity", "global_allocation"]

GRID = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 ... 0.9


@dataclass
class Curve:
    """A weight's measured sensitivity: relative output error at each sparsity of `GRID`."""

    name: str
    size: int
    errors: list[float]
    chosen: float | None = None

    def to_dict(self) -> dict:
        return {
            "sparsity": list(GRID),
            "error": [float(e) for e in self.errors],
            "chosen": self.chosen,
        }


def _mask(weight, spec, axis, stats, axes, criterion, sparsity):
    spec = attrs.evolve(spec, sparsity=sparsity)
    if criterion == "magnitude":
        from milsparse.passes.prune import _build_mask

        return _build_mask(weight, spec, axis)
    return data_aware.wanda_mask(weight, spec, axis, stats, axes)


def sensitivity(name, weight, spec, axis, stats: LayerStats, axes, criterion) -> Curve:
    """The layer's relative output error at each sparsity of GRID (see the module docstring)."""
    # The relative error depends on neither the weight's scale nor X^T X's: measure it on both
    # scaled by powers of two (exact) to at most 1, so that W H W^T stays inside float32
    # whatever the weights and activations (large ones would make every error inf or nan, or
    # the energy inf and every error 0).
    scale = data_aware.unit_scale(weight)
    stack, _ = data_aware._matrices(weight, stats, axes)
    stack *= scale
    h = stats.xtx * data_aware.unit_scale(stats.xtx)
    energy = sum(float(((stack[g] @ h[g]) * stack[g]).sum()) for g in range(stack.shape[0]))
    errors = []
    for s in GRID:
        if s == 0:
            errors.append(0.0)
            continue
        keep = _mask(weight, spec, axis, stats, axes, criterion, s)
        dropped = np.where(keep, 0, weight)
        d, _ = data_aware._matrices(dropped, stats, axes)
        d *= scale
        err = sum(float(((d[g] @ h[g]) * d[g]).sum()) for g in range(d.shape[0]))
        errors.append(err / energy if energy > 0 else 0.0)
    if not all(math.isfinite(e) for e in errors):
        raise ConfigError(
            f"{name}: its output error cannot be measured (the calibration activations' X^T X "
            "overflows float32); scale the calibration inputs down, or use allocate uniform"
        )
    return Curve(name, int(weight.size), errors)


def global_allocation(curves: list[Curve], target: float) -> dict[str, float]:
    """{weight: sparsity} with exactly round_half_up(target * total elements) zeros in all
    (up to each layer's own rounding), the summed error kept low (see the module docstring)."""
    total = sum(c.size for c in curves)
    goal = masks.round_half_up(target * total)
    most = sum(masks.round_half_up(GRID[-1] * c.size) for c in curves)
    if goal > most:
        if target > GRID[-1]:
            raise ValueError(
                f"a target of {target:g} needs more than {GRID[-1]:g} sparsity in some layer"
            )
        # target GRID[-1] itself: every layer at the grid's last point is the target, up to the
        # layers' own rounding (two layers of 6 hold 5 + 5 zeros at 0.9, the total's 0.9 is 11)
        goal = most
    level = {c.name: 0 for c in curves}
    zeros = 0
    step = GRID[1] - GRID[0]
    while zeros < goal:
        best, best_cost = None, np.inf
        for c in curves:
            i = level[c.name]
            if i + 1 >= len(GRID):
                continue
            cost = (c.errors[i + 1] - c.errors[i]) / (c.size * step)
            if cost < best_cost:
                best, best_cost = c, cost
        if best is None:  # every layer at the grid's end: cannot happen while goal <= most
            raise AssertionError(f"allocation stopped at {zeros} of {goal} zeros")
        i = level[best.name]
        gain = masks.round_half_up(GRID[i + 1] * best.size) - masks.round_half_up(
            GRID[i] * best.size
        )
        if zeros + gain >= goal:  # the last step, cut to land on the target
            remaining = goal - zeros
            sparsity = (masks.round_half_up(GRID[i] * best.size) + remaining) / best.size
            chosen = {c.name: GRID[level[c.name]] for c in curves}
            chosen[best.name] = sparsity
            return chosen
        level[best.name] = i + 1
        zeros += gain
    return {c.name: GRID[level[c.name]] for c in curves}
