"""Data-aware pruning criteria on calibration statistics (`milsparse.ir.calibration`).

- `wanda_mask`: Wanda (Sun et al., 2023): score `|W_ij| * ||X_j||`, compared within each
  output row for unstructured sparsity (as the paper does), within each group for n:m and
  blocks; the weight's values are kept as they are.
- `sparsegpt`: SparseGPT (Frantar & Alistarh, 2023): the OBS update with the inverse Hessian
  `H = X^T X / rows + damp * mean(diag) * I`, in lazy column blocks of 128. The mask is chosen
  as the columns are reached (adaptive), from `w^2 / [H^-1]_jj^2`: for unstructured patterns
  per block with exactly `round_half_up(s * N)` zeros over the whole weight (per row with
  scope channel), for n:m along the input columns per group of m; block patterns and n:m along
  the output channels (or any n:m of a conv, whose input channels are strided in the im2col
  columns) take their mask once, up front, from the same scores. The kept weights change to
  compensate for the pruned ones; the pattern's counts and structure hold exactly.

Everything is computed in float64; the result is rounded to the weight's dtype.
"""

from __future__ import annotations

import numpy as np
from milsparse.ir import masks
from milsparse.ir.calibration import LayerStats
from milsparse.ir.errors import ConfigError

__all__ = ["wanda_mask", "sparsegpt", "LAZY_BLOCK"]

LAZY_BLOCK = 128


def _pattern_mask(weight, spec, axis, scores, output_axis):
    """The spec's pattern on `scores` (larger = keep)."""
    if spec.pattern == "magnitude":
        row_axis = output_axis if spec.scope == "channel" or axis is None else axis
        return masks.magnitude_mask(weight, spec.sparsity, scores=scores, axis=row_axis)
    if spec.pattern == "block":
        return masks.block_mask(weight, spec.sparsity, spec.block_size, axis, scores=scores)
    if spec.pattern == "n:m":
        return masks.nm_mask(weight, spec.n, spec.m, axis, scores=scores)
    raise ConfigError(
        f"{spec.to_string()}: data-aware criteria apply to unstructured, n:m and block patterns"
    )


def wanda_mask(weight, spec, axis, stats: LayerStats, axes) -> np.ndarray:
    """Keep-mask of Wanda's scores; unstructured sparsity is ranked per output row."""
    scale = stats.wanda_scale(weight.shape, axes)
    scores = np.abs(weight.astype(np.float32)) * scale.astype(np.float32)
    if spec.pattern == "magnitude":
        return masks.magnitude_mask(weight, spec.sparsity, scores=scores, axis=axes[1])
    return _pattern_mask(weight, spec, axis, scores, axes[1])


def _matrices(weight: np.ndarray, stats: LayerStats, axes):
    """The weight as [groups, rows, K] float64 in the statistics' column order, and the
    function that puts such a stack back into the weight's layout."""
    kind = stats.columns.kind
    shape = weight.shape
    if kind == "conv":
        groups = stats.columns.groups
        stack = weight.astype(np.float64).reshape(groups, shape[0] // groups, -1)
        return stack, lambda s: s.reshape(shape)
    if kind == "linear":
        return weight.astype(np.float64)[None], lambda s: s[0]
    in_axis = axes[0]  # matmul operand: rows are the other axis
    moved = np.moveaxis(weight.astype(np.float64), in_axis, -1)
    return moved[None], lambda s: np.moveaxis(s[0], -1, in_axis)


def _inverse_factor(xtx: np.ndarray, rows: int, dampening: float) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), H = X^T X / rows, damped.

    With J the reversal permutation, the lower Cholesky factor C of J H J gives H = R R^T for
    the upper triangular R = J C J, so U = R^-1: one factorisation and one triangular inverse,
    no explicit H^-1 (fewer K x K temporaries than inverting, then factoring)."""
    h = xtx / max(rows, 1)
    diag = np.diag(h).copy()
    dead = np.flatnonzero(diag == 0)
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += dampening * float(np.mean(np.diag(h)))
    c = np.linalg.cholesky(h[::-1, ::-1])
    del h
    r = c[::-1, ::-1]
    return np.linalg.inv(r)


def singular(xtx: np.ndarray, rows: int) -> bool:
    """Whether `X^T X / rows` (dead columns aside) is singular: the calibration inputs span
    fewer dimensions than the weight has inputs, and the update leans on the dampening."""
    h = xtx / max(rows, 1)
    diag = np.diag(h)
    live = np.flatnonzero(diag > 0)
    if live.size == 0:
        return False
    h = h[np.ix_(live, live)]
    scale = float(np.mean(np.diag(h)))
    try:  # positive definite beyond rounding: a Cholesky factor with no negligible pivot
        pivots = np.diag(np.linalg.cholesky(h)) ** 2
    except np.linalg.LinAlgError:
        return True
    return bool(pivots.min() < 1e-9 * scale)


def sparsegpt(weight, spec, axis, stats: LayerStats, axes, dampening: float = 0.01):
    """(keep mask, new weight in its dtype, note or None): SparseGPT's pruning of `weight`
    (see the module docstring); the note says when `X^T X` is singular (the update then leans
    on the dampening, and more of it may serve better)."""
    if stats.xtx is None:
        raise ValueError("sparsegpt needs X^T X statistics")
    stack, unstack = _matrices(weight, stats, axes)
    groups, rows, k = stack.shape
    factors = [_inverse_factor(stats.xtx[g], stats.rows, dampening) for g in range(groups)]
    adaptive_nm = spec.pattern == "n:m" and stats.columns.kind != "conv" and axis == axes[0]
    adaptive = spec.pattern == "magnitude" or adaptive_nm
    fixed_keep = None
    if not adaptive:  # one mask up front from the OBS scores of the original weight
        d = np.stack([np.diag(u) for u in factors])  # [G, K]
        scores_stack = stack**2 / (d[:, None, :] ** 2)
        scores = unstack(scores_stack).astype(np.float32)
        fixed_keep = _pattern_mask(weight, spec, axis, scores, axes[1])
        fixed_stack, _ = _matrices(fixed_keep.astype(np.float64), stats, axes)
        fixed_stack = fixed_stack != 0
    per_row = spec.pattern == "magnitude" and spec.scope == "channel"
    done = 0  # elements already passed, for exact cumulative counts
    row_done = 0
    keep_stack = np.ones(stack.shape, bool)
    for g in range(groups):
        w = stack[g]
        u = factors[g]
        for start in range(0, k, LAZY_BLOCK):
            end = min(start + LAZY_BLOCK, k)
            w1 = w[:, start:end].copy()
            u1 = u[start:end, start:end]
            d1 = np.diag(u1)
            keep1 = np.ones(w1.shape, bool)
            if spec.pattern == "magnitude":
                score = w1**2 / d1[None, :] ** 2
                if per_row:
                    width = end - start
                    before = masks.round_half_up(spec.sparsity * row_done)
                    after = masks.round_half_up(spec.sparsity * (row_done + width))
                    count = after - before
                    if count:
                        order = np.argsort(score, axis=1, kind="stable")[:, :count]
                        np.put_along_axis(keep1, order, False, axis=1)
                else:
                    before = masks.round_half_up(spec.sparsity * done)
                    after = masks.round_half_up(spec.sparsity * (done + w1.size))
                    count = after - before
                    if count:
                        lowest = masks.select_lowest(score.ravel(), count)
                        keep1 &= ~lowest.reshape(w1.shape)
            elif fixed_keep is not None:
                keep1 = fixed_stack[g][:, start:end].copy()
            err = np.zeros_like(w1)
            for i in range(end - start):
                if adaptive_nm and (start + i) % spec.m == 0:
                    width = min(spec.m, end - start - i)
                    score = w1[:, i : i + width] ** 2 / d1[i : i + width][None, :] ** 2
                    zeros = masks.round_half_up(spec.n * width / spec.m)
                    if zeros:
                        order = np.argsort(score, axis=1, kind="stable")[:, :zeros]
                        part = np.ones(score.shape, bool)
                        np.put_along_axis(part, order, False, axis=1)
                        keep1[:, i : i + width] = part
                column = w1[:, i]
                q = np.where(keep1[:, i], column, 0.0)
                e = (column - q) / u1[i, i]
                w1[:, i:] -= np.outer(e, u1[i, i:])
                w1[:, i] = q
                err[:, i] = e
            w[:, start:end] = w1
            w[:, end:] -= err @ u[start:end, end:]
            keep_stack[g][:, start:end] = keep1
            done += w1.size
            row_done += end - start
        if per_row:
            row_done = 0
    keep = unstack(keep_stack.astype(np.uint8)).astype(bool)
    new = unstack(np.where(keep_stack, stack, 0.0)).astype(weight.dtype)
    # a kept weight that rounds to zero in the weight's dtype is pruned by rounding: keep the
    # pattern's count exact by storing the smallest nonzero of its sign instead
    tiny = keep & (new == 0)
    if tiny.any():
        smallest = np.finfo(weight.dtype).smallest_subnormal
        new[tiny] = np.where(unstack(stack)[tiny] < 0, -smallest, smallest).astype(weight.dtype)
    note = None
    if any(singular(stats.xtx[g], stats.rows) for g in range(groups)):
        few = stats.rows < k
        why = (
            f"{stats.rows} activation rows for {k} inputs: more samples"
            if few
            else "the calibration inputs span fewer dimensions than its inputs: more varied samples"
        )
        note = (
            f"X^T X is singular ({why}, or more dampening than {dampening:g}, e.g. 0.1, "
            "may serve better)"
        )
    return keep, new, note
