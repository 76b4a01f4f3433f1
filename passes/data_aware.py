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

Everything is computed in float32, as the paper does, and in place: `X^T X` becomes the factor
of `H^-1` over its own array (the statistics are consumed), so a layer with K inputs costs one
K x K float32 array (two while the singularity check factors a copy) and K x 256 panels. The
result is rounded to the weight's dtype.
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
    """The weight as [groups, rows, K] float32 in the statistics' column order, and the
    function that puts such a stack back into the weight's layout."""
    kind = stats.columns.kind
    shape = weight.shape
    if kind == "conv":
        groups = stats.columns.groups
        stack = weight.astype(np.float32).reshape(groups, shape[0] // groups, -1)
        return stack, lambda s: s.reshape(shape)
    if kind == "linear":
        return weight.astype(np.float32)[None], lambda s: s[0]
    in_axis = axes[0]  # matmul operand: rows are the other axis
    moved = np.ascontiguousarray(np.moveaxis(weight.astype(np.float32), in_axis, -1))
    return moved[None], lambda s: np.moveaxis(s[0], -1, in_axis)


# Columns per step of the blocked factorisations: their temporaries are K x PANEL, never K x K.
PANEL = 256


def cholesky_in_place(a: np.ndarray) -> None:
    """Overwrite the lower triangle of the symmetric positive definite `a` with its lower
    Cholesky factor L (a = L L^T), and zero the strict upper triangle, a panel of columns at a
    time: no second K x K array. Raises `np.linalg.LinAlgError` when `a` is not positive
    definite. `a` may be a view (a reversed one included)."""
    n = a.shape[0]
    for j in range(0, n, PANEL):
        e = min(j + PANEL, n)
        diag = np.linalg.cholesky(a[j:e, j:e])
        a[j:e, j:e] = diag
        a[j:e, e:] = 0.0
        if e == n:
            break
        panel = a[e:, j:e] @ np.linalg.inv(diag).T  # L21 = A21 L11^-T
        a[e:, j:e] = panel
        for c in range(e, n, PANEL):  # A22 -= L21 L21^T, lower part, a panel at a time
            ce = min(c + PANEL, n)
            a[c:, c:ce] -= panel[c - e :] @ panel[c - e : ce - e].T


def invert_lower_in_place(a: np.ndarray) -> None:
    """Overwrite the lower triangular `a` (strict upper triangle zero) with its inverse, a
    panel of columns at a time, from the last: X21 = -X22 L21 X11 with X11 = L11^-1, X22
    (already inverted) taken a panel of rows at a time, so no product needs a copy of it."""
    n = a.shape[0]
    for j in reversed(range(0, n, PANEL)):
        e = min(j + PANEL, n)
        inverse = np.linalg.inv(a[j:e, j:e])
        if e < n:
            l21 = a[e:, j:e].copy()
            for r in range(e, n, PANEL):  # X22 is lower triangular: row panel r reads to re
                re = min(r + PANEL, n)
                a[r:re, j:e] = -(a[r:re, e:re] @ l21[: re - e]) @ inverse
        a[j:e, j:e] = np.tril(inverse)


def _hessian_in_place(stats: LayerStats, g: int) -> np.ndarray:
    """`H = X^T X / rows` over the statistics' own array (which it consumes), dead columns
    (never active) set to 1 on the diagonal."""
    h = stats.xtx[g]
    h /= np.float32(max(stats.rows, 1))
    dead = np.flatnonzero(np.diag(h) == 0)
    h[dead, dead] = 1.0
    return h


def _inverse_factor_in_place(h: np.ndarray, dampening: float) -> np.ndarray:
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), H damped, written over `h`.

    With J the reversal permutation, the lower Cholesky factor C of J H J gives H = R R^T for
    the upper triangular R = J C J, so U = R^-1 = J C^-1 J: one factorisation and one
    triangular inverse, both in place on the reversed view, no explicit H^-1."""
    h[np.diag_indices_from(h)] += np.float32(dampening * float(np.mean(np.diag(h))))
    reversed_view = h[::-1, ::-1]
    cholesky_in_place(reversed_view)
    invert_lower_in_place(reversed_view)
    return h


# A Cholesky pivot below this fraction of the mean diagonal counts as singular: float32's
# rounding leaves pivots of about 1e-6 of the scale where the exact ones are zero.
SINGULAR_PIVOT = 1e-5


def singular(h: np.ndarray) -> bool:
    """Whether `H` (X^T X / rows, dead columns already set to 1) is singular or nearly so: the
    calibration inputs span fewer dimensions than the weight has inputs, and the update leans
    on the dampening. Factors a copy (in place)."""
    scale = float(np.mean(np.diag(h)))
    work = h.copy()
    try:
        cholesky_in_place(work)
    except np.linalg.LinAlgError:
        return True
    return bool((np.diag(work) ** 2).min() < SINGULAR_PIVOT * scale)


def unit_scale(weight: np.ndarray) -> np.float32:
    """A power of two that brings the weight's largest magnitude into [0.5, 1). Scaling by it is
    exact, and SparseGPT's update and the allocation's errors are linear (or relative) in the
    weight, so they run on the scaled weight: no overflow for weights near float32's limit."""
    peak = float(np.max(np.abs(weight))) if weight.size else 0.0
    if peak == 0 or not np.isfinite(peak):
        return np.float32(1.0)
    return np.float32(2.0 ** -int(np.frexp(peak)[1]))


def _obs_scores(w: np.ndarray, d: np.ndarray) -> np.ndarray:
    """OBS saliency `w^2 / [H^-1]_jj^2` (larger = keep). A weight whose square overflows
    float32 scores inf: it is kept, as the largest of all, so the overflow is ignored."""
    with np.errstate(over="ignore"):
        return w**2 / d**2


def sparsegpt(weight, spec, axis, stats: LayerStats, axes, dampening: float = 0.01):
    """(keep mask, new weight in its dtype, note or None): SparseGPT's pruning of `weight`
    (see the module docstring); the note says when `X^T X` is singular (the update then leans
    on the dampening)."""
    if stats.xtx is None:
        raise ValueError("sparsegpt needs X^T X statistics")
    stack, unstack = _matrices(weight, stats, axes)  # a copy: scaled and updated in place
    scale = unit_scale(weight)
    stack *= scale
    groups, rows, k = stack.shape
    few_rows = stats.rows < k
    factors, is_singular = _inverse_factors(stats, groups, dampening, few_rows)
    adaptive_nm = spec.pattern == "n:m" and stats.columns.kind != "conv" and axis == axes[0]
    fixed_stack = None
    if not (spec.pattern == "magnitude" or adaptive_nm):
        # one mask up front from the OBS scores of the original weight
        d = np.stack([np.diag(u) for u in factors])  # [G, K]
        scores = unstack(_obs_scores(stack, d[:, None, :])).astype(np.float32)
        fixed_keep = _pattern_mask(weight, spec, axis, scores, axes[1])
        fixed_stack = _matrices(fixed_keep.astype(np.float64), stats, axes)[0] != 0
    per_row = spec.pattern == "magnitude" and spec.scope == "channel"
    done = 0  # elements already passed, for exact cumulative counts
    keep_stack = np.ones(stack.shape, bool)
    for g in range(groups):
        w, u = stack[g], factors[g]
        row_done = 0
        for start in range(0, k, LAZY_BLOCK):
            end = min(start + LAZY_BLOCK, k)
            w1, u1 = w[:, start:end].copy(), u[start:end, start:end]
            d1 = np.diag(u1)
            if spec.pattern == "magnitude":
                keep1 = _magnitude_block_mask(
                    _obs_scores(w1, d1[None, :]), spec.sparsity, per_row,
                    row_done if per_row else done,
                )  # fmt: skip
            elif fixed_stack is not None:
                keep1 = fixed_stack[g][:, start:end].copy()
            else:
                keep1 = np.ones(w1.shape, bool)
            err = _obs_sweep(w1, u1, d1, keep1, spec if adaptive_nm else None, start)
            w[:, start:end] = w1
            w[:, end:] -= err @ u[start:end, end:]
            keep_stack[g][:, start:end] = keep1
            done += w1.size
            row_done += end - start
    stack /= scale
    keep, new = _pruned_values(weight, stack, keep_stack, unstack)
    return keep, new, _singular_note(stats.rows, k, dampening) if is_singular else None


def _inverse_factors(stats: LayerStats, groups: int, dampening: float, known_singular: bool):
    """(each group's upper Cholesky factor of the dampened `H^-1`, whether any `H` is
    singular: `known_singular`, else tested); consumes the statistics' X^T X, one K x K array
    per group at a time."""
    is_singular, factors = known_singular, []
    for g in range(groups):
        h = _hessian_in_place(stats, g)
        is_singular = is_singular or singular(h)
        factors.append(_inverse_factor_in_place(h, dampening))
    stats.xtx = None
    return factors, is_singular


def _magnitude_block_mask(score, sparsity: float, per_row: bool, passed: int) -> np.ndarray:
    """The keep mask of one lazy block of columns for unstructured pruning, by OBS score:
    the zeros that bring the cumulative count, over the `passed` elements (of each row, with
    `per_row`) before this block and the block's own, to round(sparsity * count)."""
    keep = np.ones(score.shape, bool)
    width = score.shape[1] if per_row else score.size
    count = masks.round_half_up(sparsity * (passed + width)) - masks.round_half_up(
        sparsity * passed
    )
    if not count:
        return keep
    if per_row:
        order = np.argsort(score, axis=1, kind="stable")[:, :count]
        np.put_along_axis(keep, order, False, axis=1)
    else:
        keep &= ~masks.select_lowest(score.ravel(), count).reshape(score.shape)
    return keep


def _obs_sweep(w1, u1, d1, keep1, nm_spec, offset: int) -> np.ndarray:
    """One lazy block's column-by-column OBS update, in place: each column is pruned to
    `keep1` and its error spread over the columns after it; returns the block's errors (for
    the update of the columns past the block). With `nm_spec`, each group of m columns picks
    its n zeros per row by OBS score as the sweep reaches it (into `keep1`; the groups start
    every m columns of the whole weight, the block's first column being column `offset`)."""
    err = np.zeros_like(w1)
    for i in range(w1.shape[1]):
        if nm_spec is not None and (offset + i) % nm_spec.m == 0:
            width = min(nm_spec.m, w1.shape[1] - i)
            score = _obs_scores(w1[:, i : i + width], d1[i : i + width][None, :])
            zeros = masks.round_half_up(nm_spec.n * width / nm_spec.m)
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
    return err


def _pruned_values(weight, stack, keep_stack, unstack):
    """(keep mask, new weight in the weight's dtype) from the updated stack. A kept weight
    that rounds to zero in the weight's dtype would be pruned by rounding: to keep the
    pattern's count exact it stores the smallest nonzero of its sign instead."""
    keep = unstack(keep_stack.astype(np.uint8)).astype(bool)
    new = unstack(np.where(keep_stack, stack, 0.0)).astype(weight.dtype)
    tiny = keep & (new == 0)
    if tiny.any():
        smallest = np.finfo(weight.dtype).smallest_subnormal
        new[tiny] = np.where(unstack(stack)[tiny] < 0, -smallest, smallest).astype(weight.dtype)
    return keep, new


def _singular_note(rows: int, k: int, dampening: float) -> str:
    """Short, and true for the usual case: a layer reading a normalised input (a LayerNorm
    output has zero mean over its features, so its columns are dependent by construction) is
    singular whatever the samples; the dampening keeps the update well defined."""
    if rows < k:
        return f"X^T X singular: {rows} activation rows for {k} inputs (more samples help)"
    return f"X^T X singular: dependent inputs (dampening {dampening:g} handles it)"
