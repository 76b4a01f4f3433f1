"""Mask builders: which weights to keep under threshold, magnitude, block and n:m pruning.

Every builder returns a boolean `keep` array with the weight's shape. They are pure numpy,
O(N) (selection by `np.partition`, never a full sort), and compute their criteria in float32 or
wider whatever the storage dtype: numpy's order statistics on large float16 arrays return NaN,
which is how coremltools' magnitude pruning silently prunes nothing on big fp16 weights.

Each builder also takes `scores`, an importance per element (larger = more important), so
data-aware criteria reuse the same patterns; by default the score is |w|.

Conventions (documented in the README):
- counts are rounded half up: `round_half_up(s * N)`;
- ties are broken by position: among equal scores, the element (or block) with the lower
  row-major index is pruned first, so results never depend on the sort algorithm;
- n:m means n zeros in every m consecutive weights along `axis`; a short tail group of r < m
  weights gets `round_half_up(n * r / m)` zeros.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "round_half_up",
    "importance",
    "select_lowest",
    "threshold_mask",
    "magnitude_mask",
    "block_mask",
    "nm_mask",
]


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's round() goes to even)."""
    return int(np.floor(x + 0.5))


def importance(weight: np.ndarray) -> np.ndarray:
    """|w| in float32, or float64 for float64 weights: never fp16."""
    weight = np.asarray(weight)
    dtype = np.float64 if weight.dtype == np.float64 else np.float32
    return np.abs(weight.astype(dtype, copy=False))


def _scores_for(weight: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
    if scores is None:
        return importance(weight)
    scores = np.asarray(scores)
    if scores.shape != weight.shape:
        raise ValueError(f"scores shape {scores.shape} does not match weight shape {weight.shape}")
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float32)
    return scores


def select_lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean array marking exactly k elements of the lowest scores (ties: lower index first).

    O(N): one `np.partition` finds the k-th score; elements strictly below it are taken, then
    the remaining quota is filled from the elements equal to it in index order.
    """
    flat = np.asarray(scores).ravel()
    n = flat.size
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} elements")
    chosen = np.zeros(n, dtype=bool)
    if k == 0:
        return chosen.reshape(np.shape(scores))
    if k == n:
        chosen[:] = True
        return chosen.reshape(np.shape(scores))
    kth = np.partition(flat, k - 1)[k - 1]
    np.less(flat, kth, out=chosen)
    missing = k - int(np.count_nonzero(chosen))
    if missing:
        ties = np.flatnonzero(flat == kth)
        chosen[ties[:missing]] = True
    return chosen.reshape(np.shape(scores))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def threshold_mask(weight: np.ndarray, threshold: float) -> np.ndarray:
    """Keep |w| > threshold (compared in float32 or wider)."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return importance(weight) > threshold


def magnitude_mask(weight: np.ndarray, sparsity: float, scores: np.ndarray | None = None) -> np.ndarray:
    """Prune exactly round_half_up(sparsity * N) elements of the lowest score."""
    _check_fraction("sparsity", sparsity)
    s = _scores_for(weight, scores)
    return ~select_lowest(s, round_half_up(sparsity * s.size))


def _channel_axis(weight: np.ndarray, axis: int) -> int:
    if weight.ndim < 2:
        raise ValueError(f"structured pruning needs a weight of rank >= 2, got shape {weight.shape}")
    if not -weight.ndim <= axis < weight.ndim:
        raise ValueError(f"axis {axis} out of range for weight of rank {weight.ndim}")
    return axis % weight.ndim


def block_mask(
    weight: np.ndarray,
    sparsity: float,
    block_size: int,
    axis: int = 0,
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """Prune whole blocks of `block_size` consecutive channels along `axis`.

    A block is `block_size` neighbours along `axis` at one position of every other axis. Blocks
    are scored by the L2 norm of their scores; a short last block (when the axis length is not a
    multiple of the block size) is scaled up to a full block's norm, sqrt(B / r) * ||b||, so its
    size neither protects nor condemns it. Exactly round_half_up(sparsity * blocks) are pruned.
    """
    _check_fraction("sparsity", sparsity)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    axis = _channel_axis(weight, axis)
    s = np.moveaxis(_scores_for(weight, scores), axis, 0)
    channels = s.shape[0]
    nblocks = -(-channels // block_size)
    tail = channels - (nblocks - 1) * block_size
    squared = np.square(s)
    pad = nblocks * block_size - channels
    if pad:
        squared = np.concatenate([squared, np.zeros((pad,) + s.shape[1:], squared.dtype)])
    energy = squared.reshape((nblocks, block_size) + s.shape[1:]).sum(axis=1)
    if tail != block_size:
        energy[-1] *= block_size / tail
    prune_blocks = select_lowest(energy, round_half_up(sparsity * energy.size))
    prune = np.repeat(prune_blocks, block_size, axis=0)[:channels]
    return np.moveaxis(~prune, 0, axis)


def nm_mask(
    weight: np.ndarray,
    n: int,
    m: int,
    axis: int = 1,
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """Prune the n lowest-scored of every m consecutive weights along `axis`.

    Groups start at index 0 of the axis; a short tail group of r weights loses
    round_half_up(n * r / m) of them. Ties go to the lower index.
    """
    if not (isinstance(m, (int, np.integer)) and m >= 1 and 0 <= n <= m):
        raise ValueError(f"n:m needs 0 <= n <= m and m >= 1, got {n}:{m}")
    axis = _channel_axis(weight, axis)
    s = np.moveaxis(_scores_for(weight, scores), axis, -1)
    length = s.shape[-1]
    rows = s.reshape(-1, length)
    prune = np.zeros(rows.shape, dtype=bool)
    full = (length // m) * m
    if full and n:
        groups = rows[:, :full].reshape(rows.shape[0], -1, m)
        full_prune = np.zeros(groups.shape, dtype=bool)
        _prune_lowest_per_group(groups, n, full_prune)
        prune[:, :full] = full_prune.reshape(rows.shape[0], full)
    tail = length - full
    tail_n = round_half_up(n * tail / m) if tail else 0
    if tail_n:
        groups = rows[:, full:].reshape(rows.shape[0], 1, tail)
        tail_prune = np.zeros(groups.shape, dtype=bool)
        _prune_lowest_per_group(groups, tail_n, tail_prune)
        prune[:, full:] = tail_prune.reshape(rows.shape[0], tail)
    keep = ~prune.reshape(s.shape)
    return np.moveaxis(keep, -1, axis)


def _prune_lowest_per_group(groups: np.ndarray, n: int, out: np.ndarray) -> None:
    """Set `out` True at the n lowest entries of each group (last axis); stable on ties."""
    # m is small, so a stable argsort along it is linear in N and gives index-order ties.
    order = np.argsort(groups, axis=-1, kind="stable")[..., :n]
    np.put_along_axis(out, order, True, axis=-1)
