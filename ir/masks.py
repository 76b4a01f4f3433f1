"""Mask builders: which weights to keep under threshold, magnitude, block and n:m pruning.

Every builder returns a boolean `keep` array with the weight's shape. They are pure numpy,
O(N) (selection by `np.partition`, never a full sort), and never do arithmetic in fp16: numpy's
percentile of a large float16 array returns NaN, which is how coremltools' magnitude pruning
silently prunes nothing on big fp16 weights. Magnitudes are ranked by exact integer keys (the
IEEE-754 bit pattern of |w|, whose unsigned order is the numeric order of finite magnitudes),
which is exact, needs no conversion and half the memory of float32 for fp16 weights; scores that
need arithmetic (block norms, thresholds) are computed in float32 or wider.

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
    "magnitude_keys",
    "all_finite",
    "exclude_zeros",
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


_KEY_TYPES = {
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000),
    np.dtype(np.float64): (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


def magnitude_keys(weight: np.ndarray) -> np.ndarray:
    """Unsigned integers ordered exactly as |w| (floats: the bit pattern without the sign).

    -0.0 and +0.0 share key 0; inf and nan get keys at or above `all_finite`'s limit. Other
    dtypes fall back to `importance` (float32 |w|).
    """
    weight = np.asarray(weight)
    spec = _KEY_TYPES.get(weight.dtype)
    if spec is None:
        return importance(weight)
    uint, magnitude_bits, _ = spec
    return np.ascontiguousarray(weight).view(uint) & uint(magnitude_bits)


# Work on about a million elements at a time: temporaries stay small and are reused by the
# allocator, instead of fresh weight-sized arrays whose page faults dominate run time.
CHUNK = 1 << 20


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def all_finite(weight: np.ndarray) -> bool:
    """True when no element is inf or nan (checked on integer keys, no float conversion)."""
    weight = np.asarray(weight)
    spec = _KEY_TYPES.get(weight.dtype)
    if weight.size == 0:
        return True
    if spec is None:
        return bool(np.isfinite(weight).all()) if weight.dtype.kind in "fc" else True
    flat = weight.ravel()
    return all(int(magnitude_keys(flat[sl]).max()) < spec[2] for sl in _chunks(flat.size))


def exclude_zeros(weight: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """keep &= (w != 0), in place and chunked; returns `keep`."""
    flat_w, flat_keep = np.asarray(weight).ravel(), keep.reshape(-1)
    for sl in _chunks(flat_w.size):
        flat_keep[sl] &= flat_w[sl] != 0
    return keep


def _kth_smallest_key(flat: np.ndarray, k: int) -> tuple[int, int]:
    """(key, ties) where key is the k-th smallest (1-based) magnitude key of `flat` and `ties`
    how many elements equal to it are needed to reach k.

    Radix selection over 16-bit digits, most significant first: one chunked histogram pass per
    digit (one for fp16, two for fp32), no copy of the weight, exact.
    """
    bits = flat.dtype.itemsize * 8
    prefix, remaining = 0, k
    for shift in range(bits - 16, -1, -16):
        hist = np.zeros(1 << 16, dtype=np.int64)
        for sl in _chunks(flat.size):
            keys = magnitude_keys(flat[sl])
            if shift + 16 < bits:
                keys = keys[(keys >> (shift + 16)) == prefix]
            digits = ((keys >> shift) & 0xFFFF).astype(np.intp, copy=False)
            hist += np.bincount(digits, minlength=1 << 16)
        cumulative = np.cumsum(hist)
        digit = int(np.searchsorted(cumulative, remaining))
        remaining -= int(cumulative[digit - 1]) if digit else 0
        prefix = (prefix << 16) | digit
    return prefix, remaining


def _kth_key_by_bracket(flat: np.ndarray, k: int) -> tuple[int, int] | None:
    """Like `_kth_smallest_key`, usually in one pass: a strided sample brackets the k-th key,
    one pass counts the keys below the bracket and gathers those inside it, and a partition of
    that small set finds the exact key. None when the bracket misses or holds too much (many
    ties), so the caller falls back to radix selection."""
    n = flat.size
    sample = np.sort(magnitude_keys(flat[:: max(1, n // 65536)]))
    size = sample.size
    q = k / n
    margin = int(4 * np.sqrt(size * q * (1 - q))) + 2
    lo_i, hi_i = int(q * size) - margin, int(q * size) + margin
    lo = int(sample[lo_i]) if lo_i > 0 else 0
    hi = int(sample[hi_i]) if hi_i < size else int(np.iinfo(sample.dtype).max)
    below, inside, gathered = 0, [], 0
    for sl in _chunks(n):
        keys = magnitude_keys(flat[sl])
        below += int(np.count_nonzero(keys < lo))
        middle = keys[(keys >= lo) & (keys <= hi)]
        gathered += middle.size
        if gathered > n // 4:
            return None
        inside.append(middle)
    rank = k - below  # 1-based rank of the k-th key inside the bracket
    if not 0 < rank <= gathered:
        return None
    middle = np.concatenate(inside)
    kth = int(np.partition(middle, rank - 1)[rank - 1])
    return kth, rank - int(np.count_nonzero(middle < kth))


def _select_lowest_magnitudes(weight: np.ndarray, k: int) -> np.ndarray:
    """select_lowest(|w|, k) for float weights, on exact integer keys, chunked."""
    flat = weight.ravel()
    chosen = np.zeros(flat.size, dtype=bool)
    if k == 0:
        return chosen
    found = _kth_key_by_bracket(flat, k)
    kth, ties = found if found is not None else _kth_smallest_key(flat, k)
    for sl in _chunks(flat.size):
        np.less(magnitude_keys(flat[sl]), kth, out=chosen[sl])
    for sl in _chunks(flat.size):
        if not ties:
            break
        equal = np.flatnonzero(magnitude_keys(flat[sl]) == kth)[:ties]
        chosen[sl.start + equal] = True
        ties -= equal.size
    return chosen


def _scores_for(
    weight: np.ndarray, scores: np.ndarray | None, exact_keys: bool = False
) -> np.ndarray:
    if scores is None:
        return magnitude_keys(weight) if exact_keys else importance(weight)
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
    """Keep |w| > threshold, compared in float64 (a chunk at a time).

    Not in the weight's own precision: float32(0.1) = 0.10000000149 is above the threshold 0.1,
    but a float32 comparison would round the threshold to the same value and prune it.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    weight = np.asarray(weight)
    flat = weight.ravel()
    keep = np.empty(flat.size, dtype=bool)
    limit = np.float64(threshold)
    for sl in _chunks(flat.size):
        np.greater(np.abs(flat[sl].astype(np.float64)), limit, out=keep[sl])
    return keep.reshape(weight.shape)


def magnitude_mask(
    weight: np.ndarray,
    sparsity: float,
    scores: np.ndarray | None = None,
    axis: int | None = None,
) -> np.ndarray:
    """Prune exactly round_half_up(sparsity * N) elements of the lowest score.

    With `axis`, each slice along it (each output channel) is ranked on its own and loses
    exactly round_half_up(sparsity * slice size) elements: after batchnorm folding, channels
    differ in scale by orders of magnitude, and one ranking over the whole tensor would empty
    the low-scale channels.
    """
    _check_fraction("sparsity", sparsity)
    weight = np.asarray(weight)
    if axis is not None:
        return _magnitude_mask_per_slice(weight, sparsity, _channel_axis(weight, axis), scores)
    k = round_half_up(sparsity * weight.size)
    if scores is None and weight.dtype in _KEY_TYPES:
        keep = _select_lowest_magnitudes(weight, k)
        np.logical_not(keep, out=keep)
        return keep.reshape(weight.shape)
    s = _scores_for(weight, scores)
    return ~select_lowest(s, k)


def _magnitude_mask_per_slice(weight, sparsity, axis, scores) -> np.ndarray:
    """Per-slice magnitude selection: every slice along `axis` keeps exactly its share.

    Each element's key is made unique by its position inside the slice (key * size + index),
    so one partition per row finds exactly k elements, ties to the lower index as everywhere.
    """
    source = np.moveaxis(weight if scores is None else _scores_for(weight, scores), axis, 0)
    rows = source.shape[0]
    size = int(np.prod(source.shape[1:], dtype=np.int64))
    k = round_half_up(sparsity * size)
    keep = np.ones((rows, size), dtype=bool)
    if k == 0 or size == 0:
        return np.moveaxis(keep.reshape(source.shape), 0, axis)
    position = np.arange(size, dtype=np.uint64)
    step = max(1, CHUNK // max(size, 1))
    for start in range(0, rows, step):
        block = np.ascontiguousarray(source[start : start + step]).reshape(-1, size)
        if scores is None and block.dtype in _KEY_TYPES and block.dtype.itemsize <= 4:
            keys = magnitude_keys(block).astype(np.uint64)
        else:  # scores, or float64 weights: rank by value, then position
            order = np.argsort(
                np.argsort(
                    _scores_for(block, None) if scores is None else block, axis=1, kind="stable"
                ),
                axis=1,
                kind="stable",
            )
            keys = order.astype(np.uint64)
        keys *= np.uint64(size)
        keys += position
        kth = np.partition(keys, k - 1, axis=1)[:, k - 1 : k]
        keep[start : start + step] = keys > kth
    return np.moveaxis(keep.reshape(source.shape), 0, axis)


def _channel_axis(weight: np.ndarray, axis: int) -> int:
    if weight.ndim < 2:
        raise ValueError(
            f"structured pruning needs a weight of rank >= 2, got shape {weight.shape}"
        )
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
    A block longer than the axis is the whole axis (its size is never allocated).
    """
    _check_fraction("sparsity", sparsity)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    axis = _channel_axis(weight, axis)
    s = np.moveaxis(_scores_for(weight, scores), axis, 0)
    channels = s.shape[0]
    block_size = max(1, min(block_size, channels))
    nblocks = -(-channels // block_size)
    tail = channels - (nblocks - 1) * block_size
    energy = _block_energy(s, block_size, nblocks)
    if tail != block_size:
        energy[-1] *= block_size / tail
    prune_blocks = select_lowest(energy, round_half_up(sparsity * energy.size))
    prune = np.repeat(prune_blocks, block_size, axis=0)[:channels]
    return np.moveaxis(~prune, 0, axis)


def _block_energy(s: np.ndarray, block_size: int, nblocks: int) -> np.ndarray:
    """Sum of squares of each block of `block_size` rows of `s`, in float64.

    float32 squares overflow for |w| above ~1.8e19 and vanish below ~1e-23, which would rank
    blocks by position instead of norm; float64 holds the square of any float32. Worked a slab
    of rows at a time, so the float64 copy stays small.
    """
    rest = s.shape[1:]
    energy = np.zeros((nblocks,) + rest, dtype=np.float64)
    per_row = max(1, int(np.prod(rest, dtype=np.int64)))
    rows_per_step = max(block_size, (CHUNK // per_row) // block_size * block_size)
    for start in range(0, s.shape[0], rows_per_step):
        slab = s[start : start + rows_per_step].astype(np.float64)
        np.square(slab, out=slab)
        first = start // block_size
        # rows of a slab start on a block boundary; np.add.reduceat sums each block's rows
        offsets = np.arange(0, slab.shape[0], block_size)
        energy[first : first + offsets.size] += np.add.reduceat(slab, offsets, axis=0)
    return energy


def nm_mask(
    weight: np.ndarray,
    n: int,
    m: int,
    axis: int = 1,
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """Prune the n lowest-scored of every m consecutive weights along `axis`.

    Groups start at index 0 of the axis; a short tail group of r weights loses
    round_half_up(n * r / m) of them. Ties go to the lower index. Works through the weight a
    slab of the leading axis at a time.
    """
    if not (isinstance(m, (int, np.integer)) and m >= 1 and 0 <= n <= m):
        raise ValueError(f"n:m needs 0 <= n <= m and m >= 1, got {n}:{m}")
    weight = np.asarray(weight)
    axis = _channel_axis(weight, axis)
    if scores is not None:
        scores = _scores_for(weight, scores)

    def keys_of(block):
        if scores is not None:
            return block
        return magnitude_keys(block) if block.dtype in _KEY_TYPES else importance(block)

    source = np.moveaxis(weight if scores is None else scores, axis, -1)
    keep = np.empty(weight.shape, dtype=bool)
    keep_moved = np.moveaxis(keep, axis, -1)
    length = source.shape[-1]
    per_slab = max(1, int(np.prod(source.shape[1:], dtype=np.int64)))
    step = max(1, CHUNK // per_slab)
    for i in range(0, source.shape[0], step):
        block = source[i : i + step]
        rows = keys_of(block).reshape(-1, length)
        keep_moved[i : i + step] = ~_nm_prune_rows(rows, n, m).reshape(block.shape)
    return keep


def _nm_prune_rows(rows: np.ndarray, n: int, m: int) -> np.ndarray:
    """Boolean prune mask for n:m groups along the last axis of a 2-D array of scores."""
    length = rows.shape[-1]
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
    return prune


def _prune_lowest_per_group(groups: np.ndarray, n: int, out: np.ndarray) -> None:
    """Set `out` True at the n lowest entries of each group (last axis); ties to the lower index.

    For the usual small m, each element's rank inside its group is counted with m*(m-1)
    vectorised comparisons (linear in N, no sort); larger groups use a stable argsort.
    """
    m = groups.shape[-1]
    if m > 16:
        order = np.argsort(groups, axis=-1, kind="stable")[..., :n]
        np.put_along_axis(out, order, True, axis=-1)
        return
    lanes = np.ascontiguousarray(np.moveaxis(groups, -1, 0))  # lanes[i]: i-th member of each group
    rank = np.empty(lanes.shape[1:], dtype=np.uint8)
    scratch = np.empty(lanes.shape[1:], dtype=bool)
    for i in range(m):
        rank.fill(0)
        for j in range(m):
            if j != i:
                # an equal score earlier in the group ranks lower: ties go to the lower index
                (np.less_equal if j < i else np.less)(lanes[j], lanes[i], out=scratch)
                rank += scratch
        np.less(rank, n, out=out[..., i])
