"""Look-up tables for palettization: 2^nbits values that stand for a weight's values.

k-means in one dimension, over a weighted histogram of the values rather than the values:

- fp16 weights have at most 65,536 distinct values; their histogram (one `np.bincount` over
  the bit patterns) is exact, so k-means over it is k-means over the weight, at a cost that no
  longer grows with the weight's size;
- fp32 weights are binned by the top 16 bits of an order-preserving key (sign, exponent, 7
  mantissa bits): bins are about 1/128 of a value wide relative to its magnitude, so they
  follow heavy tails, and each bin is represented by the exact (weighted) mean of its values;
  assignments are then made per bin, the final indices per value.

Everything is computed in float64, never in fp16 (numpy's percentile of large fp16 arrays is
NaN). Up to 64 entries (6-bit LUTs) the k-means is exact: a dynamic program over the sorted
histogram (`optimal_kmeans_1d`); for 8-bit LUTs, Lloyd's iterations from weighted quantiles,
reseeding clusters that empty at the point with the largest error. Weights (`importance`, e.g.
activation energy) scale each value's squared error. `mode="uniform"` gives evenly spaced
entries between the extremes instead.

Vector palettization (`fit_vector_lut`: each entry stands for V consecutive elements) has no
histogram shortcut: it runs k-means++ seeding and Lloyd's iterations in float64 on the vectors,
or on a fixed-seed sample of `VECTOR_SAMPLE` of them when there are more (the table of a
multi-million-vector weight is settled long before that many points); every vector is then
assigned its nearest entry, in chunks.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "value_histogram",
    "kmeans_1d",
    "optimal_kmeans_1d",
    "lloyd_1d",
    "fit_lut",
    "assign_indices",
    "fit_vector_lut",
    "assign_vector_indices",
    "reconstruction_error",
]

_CHUNK = 1 << 20
# every fp16 bit pattern's value (NaN patterns included: never present in a fitted weight)
with np.errstate(invalid="ignore"):
    _FP16_VALUES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    _FP16_VALUES = _FP16_VALUES.astype(np.float64)


def _ordered_keys16(values: np.ndarray) -> np.ndarray:
    """uint16 keys whose order is the values' numeric order (fp16: the whole pattern; fp32: its
    top 16 bits). Negative numbers have their bits flipped, positive ones the sign bit set."""
    if values.dtype == np.float16:
        u = values.view(np.uint16)
    else:
        u = (values.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    negative = (u & np.uint16(0x8000)) != 0
    return np.where(negative, ~u, u | np.uint16(0x8000))


def value_histogram(
    values: np.ndarray, importance: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(points, mass): the distinct values (fp16) or bin means (fp32) in ascending order, and
    the summed importance (default 1 per value) at each; float64."""
    values = np.ascontiguousarray(values).ravel()
    if values.dtype not in (np.float16, np.float32):
        raise ValueError(f"palettization fits float16 or float32 values, got {values.dtype}")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float64).ravel()
        if importance.shape != values.shape:
            raise ValueError("importance must have one entry per value")
    if values.dtype == np.float16 and importance is None:
        # one counting pass over the bit patterns; the 65,536 possible values, sorted once
        bits = values.view(np.uint16)
        counts = np.zeros(1 << 16, np.int64)
        for start in range(0, bits.size, 1 << 18):  # chunks: bincount's int64 copy stays small
            counts += np.bincount(bits[start : start + (1 << 18)], minlength=1 << 16)
        present = np.flatnonzero(counts)
        points = _FP16_VALUES[present]
        order = np.argsort(points, kind="stable")
        return points[order], counts[present][order].astype(np.float64)
    mass = np.zeros(1 << 16)
    total = np.zeros(1 << 16)
    for start in range(0, values.size, _CHUNK):
        part = values[start : start + _CHUNK]
        keys = _ordered_keys16(part)
        w = None if importance is None else importance[start : start + _CHUNK]
        mass += np.bincount(keys, weights=w, minlength=1 << 16)
        weighted = part.astype(np.float64) if w is None else part.astype(np.float64) * w
        total += np.bincount(keys, weights=weighted, minlength=1 << 16)
    present = mass > 0
    return total[present] / mass[present], mass[present]


def _weighted_quantiles(points, mass, k) -> np.ndarray:
    cumulative = np.cumsum(mass)
    targets = (np.arange(k) + 0.5) / k * cumulative[-1]
    return points[np.minimum(np.searchsorted(cumulative, targets), points.size - 1)]


# Exact k-means costs about k * log2(points) vectorised steps; beyond 64 entries (8-bit LUTs)
# Lloyd's algorithm takes over, where a local optimum is within a fraction of an 8-bit step.
EXACT_MAX_ENTRIES = 64


def kmeans_1d(points: np.ndarray, mass: np.ndarray, k: int) -> np.ndarray:
    """k centroids (ascending, float64) minimising sum(mass * (point - centroid)^2) over the
    ascending `points`: exactly (`optimal_kmeans_1d`) for k <= EXACT_MAX_ENTRIES, else Lloyd's
    local optimum; with k or fewer points, the points themselves."""
    points = np.asarray(points, dtype=np.float64)
    mass = np.asarray(mass, dtype=np.float64)
    if points.size <= k:
        return np.concatenate([points, np.full(k - points.size, points[-1] if points.size else 0)])
    if k <= EXACT_MAX_ENTRIES:
        return optimal_kmeans_1d(points, mass, k)
    return lloyd_1d(points, mass, k)


def optimal_kmeans_1d(points: np.ndarray, mass: np.ndarray, k: int) -> np.ndarray:
    """The exact weighted k-means of ascending 1-D points, by dynamic programming.

    D[l][i], the least cost of points[0..i] in l+1 clusters, is min over j of D[l-1][j-1] plus
    the cost of cluster points[j..i] (from prefix sums, O(1)). The best j is monotone in i for
    1-D k-means, so each layer is solved by divide and conquer over i, breadth-first: every
    level of the recursion is one vectorised numpy step over all its segments, O(n) work, and
    a layer takes about log2(n) steps. The best j is also no smaller than the previous
    layer's at the same i (one cluster more leaves the last one no longer), which narrows
    the ranges.
    """
    n = points.size
    shift = float(np.average(points, weights=mass))  # centred sums lose less to cancellation
    x = points - shift
    w = np.concatenate([[0.0], np.cumsum(mass)])
    wx = np.concatenate([[0.0], np.cumsum(mass * x)])
    wxx = np.concatenate([[0.0], np.cumsum(mass * x * x)])

    def cost(j, i):  # cluster points[j..i], inclusive
        weight = w[i + 1] - w[j]
        moment = wx[i + 1] - wx[j]
        return np.maximum((wxx[i + 1] - wxx[j]) - moment * moment / weight, 0.0)

    layer = cost(np.zeros(n, np.intp), np.arange(n))
    starts = np.zeros((k, n), np.intp)  # starts[l][i]: first point of the last cluster
    for level in range(1, k):
        previous = layer
        layer = np.full(n, np.inf)
        # segments of i with their candidate range of j: [i_lo, i_hi], [j_lo, j_hi]; the last
        # layer is needed at its last point only
        i_lo = np.array([n - 1 if level == k - 1 else level])
        i_hi = np.array([n - 1])
        j_lo, j_hi = np.array([level]), np.array([n - 1])
        floor = starts[level - 1]
        while i_lo.size:
            mid = (i_lo + i_hi) // 2
            last = np.minimum(j_hi, mid)
            # with one cluster more, the last cluster starts no earlier: a tighter lower bound
            first_j = np.maximum(j_lo, floor[mid])
            first_j = np.where(first_j <= last, first_j, j_lo)
            counts = last - first_j + 1
            task = np.repeat(np.arange(mid.size), counts)
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
            j = first_j[task] + np.arange(task.size) - offsets[task]
            values = previous[j - 1] + cost(j, mid[task])
            best = np.minimum.reduceat(values, offsets)
            first = np.flatnonzero(values == best[task])
            # the smallest j reaching each segment's minimum (`task` ascends)
            tasks = task[first]
            pick = np.flatnonzero(np.concatenate([[True], tasks[1:] != tasks[:-1]]))
            chosen = j[first[pick]]
            layer[mid] = best
            starts[level, mid] = chosen
            left = mid > i_lo
            right = mid < i_hi
            i_lo, i_hi, j_lo, j_hi = (
                np.concatenate([i_lo[left], mid[right] + 1]),
                np.concatenate([mid[left] - 1, i_hi[right]]),
                np.concatenate([j_lo[left], chosen[right]]),
                np.concatenate([chosen[left], j_hi[right]]),
            )
    centroids = np.empty(k)
    end = n - 1
    for level in range(k - 1, -1, -1):
        begin = starts[level, end] if level else 0
        centroids[level] = (wx[end + 1] - wx[begin]) / (w[end + 1] - w[begin]) + shift
        end = begin - 1
    return centroids


def lloyd_1d(points: np.ndarray, mass: np.ndarray, k: int, iters: int = 100) -> np.ndarray:
    """Lloyd's algorithm from weighted quantiles: a local optimum of weighted 1-D k-means."""
    centroids = np.unique(_weighted_quantiles(points, mass, k))
    while centroids.size < k:  # quantiles collided on heavy points: split the worst cluster
        centroids = _reseed(points, mass, centroids)
    for _ in range(iters):
        members = np.searchsorted((centroids[:-1] + centroids[1:]) / 2, points)
        weight = np.bincount(members, weights=mass, minlength=k)
        moment = np.bincount(members, weights=mass * points, minlength=k)
        updated = np.where(weight > 0, moment / np.where(weight > 0, weight, 1), np.nan)
        if np.isnan(updated).any():
            updated = updated[~np.isnan(updated)]
            while updated.size < k:
                updated = _reseed(points, mass, updated)
        updated = np.sort(updated)
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids


def _reseed(points, mass, centroids) -> np.ndarray:
    """Add a centroid at the point contributing most to the error (not already a centroid)."""
    nearest = _nearest(centroids, points)
    error = mass * (points - centroids[nearest]) ** 2
    error[np.isin(points, centroids)] = -1
    return np.sort(np.append(centroids, points[int(np.argmax(error))]))


def _nearest(lut: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of the nearest LUT entry (ascending LUT; a value halfway goes to the lower)."""
    return np.searchsorted((lut[:-1] + lut[1:]) / 2, values)


def fit_lut(
    values: np.ndarray,
    nbits: int,
    importance: np.ndarray | None = None,
    mode: str = "kmeans",
) -> np.ndarray:
    """A LUT of 2^nbits entries, ascending, in the values' dtype, fitted to `values` (for a
    sparse weight: its nonzeros only, so no entry is spent on zero)."""
    if not isinstance(nbits, int) or not 1 <= nbits <= 8:
        raise ValueError(f"nbits must be an integer from 1 to 8, got {nbits!r}")
    values = np.asarray(values)
    k = 1 << nbits
    if values.size == 0:
        return np.zeros(k, values.dtype)
    if mode == "uniform":
        lo, hi = float(values.min()), float(values.max())
        return np.linspace(lo, hi, k).astype(values.dtype)
    if mode != "kmeans":
        raise ValueError(f"mode must be 'kmeans' or 'uniform', got {mode!r}")
    points, mass = value_histogram(values, importance)
    centroids = kmeans_1d(points, mass, k)
    # stored in the weight's dtype; entries that round together are fine (never indexed twice)
    return np.sort(centroids.astype(values.dtype))


def assign_indices(values: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint8 index of the nearest entry of the ascending `lut` for every value (in float64).
    A large fp16 array is looked up in a table of the index of all 65,536 fp16 values."""
    values = np.asarray(values)
    bounds = np.asarray(lut, dtype=np.float64)
    bounds = (bounds[:-1] + bounds[1:]) / 2
    if values.dtype == np.float16 and values.size > 1 << 16:
        table = np.minimum(np.searchsorted(bounds, _FP16_VALUES), bounds.size).astype(np.uint8)
        return table[np.ascontiguousarray(values).view(np.uint16)]
    flat = values.ravel()
    out = np.empty(flat.size, np.uint8)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start : start + _CHUNK].astype(np.float64)
        out[start : start + _CHUNK] = np.searchsorted(bounds, part)
    return out.reshape(values.shape)


def reconstruction_error(values: np.ndarray, lut: np.ndarray, indices: np.ndarray) -> float:
    """sum((lut[indices] - values)^2) / sum(values^2), in float64."""
    v = np.asarray(values, dtype=np.float64).ravel()
    q = np.asarray(lut, dtype=np.float64)[np.asarray(indices).ravel()]
    energy = float(v @ v)
    return float(((q - v) ** 2).sum() / energy) if energy else 0.0


VECTOR_SAMPLE = 1 << 18


def _sq_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[N, K] squared distances, float64."""
    cross = points @ centroids.T
    return np.maximum(
        (points * points).sum(1)[:, None] - 2 * cross + (centroids * centroids).sum(1)[None, :], 0
    )


def fit_vector_lut(
    vectors: np.ndarray, nbits: int, *, iters: int = 50, seed: int = 0
) -> np.ndarray:
    """A table [2^nbits, V] in the vectors' dtype, by k-means on the rows of `vectors` [N, V]:
    k-means++ seeding (fixed seed), then Lloyd's iterations until no assignment changes. Rows
    beyond `VECTOR_SAMPLE` are sampled (fixed seed); clusters that empty are reseeded at the
    worst-fitted point. Fewer distinct rows than entries: the rows themselves, repeated."""
    if not isinstance(nbits, int) or not 1 <= nbits <= 8:
        raise ValueError(f"nbits must be an integer from 1 to 8, got {nbits!r}")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [N, V], got shape {vectors.shape}")
    k = 1 << nbits
    if vectors.shape[0] == 0:
        return np.zeros((k, vectors.shape[1]), vectors.dtype)
    rng = np.random.default_rng(seed)
    points = vectors
    if points.shape[0] > VECTOR_SAMPLE:
        points = points[np.sort(rng.choice(points.shape[0], VECTOR_SAMPLE, replace=False))]
    points = np.unique(points.astype(np.float64), axis=0)
    if points.shape[0] <= k:
        table = np.concatenate([points, np.repeat(points[-1:], k - points.shape[0], 0)])
        return table.astype(vectors.dtype)
    # k-means++ seeding
    centroids = np.empty((k, points.shape[1]))
    centroids[0] = points[rng.integers(points.shape[0])]
    nearest = ((points - centroids[0]) ** 2).sum(1)
    for j in range(1, k):
        total = nearest.sum()
        pick = rng.choice(points.shape[0], p=nearest / total) if total > 0 else j
        centroids[j] = points[pick]
        nearest = np.minimum(nearest, ((points - centroids[j]) ** 2).sum(1))
    members = None
    for _ in range(iters):
        distances = _sq_distances(points, centroids)
        updated = distances.argmin(1)
        if members is not None and np.array_equal(updated, members):
            break
        members = updated
        counts = np.bincount(members, minlength=k)
        for d in range(points.shape[1]):
            sums = np.bincount(members, weights=points[:, d], minlength=k)
            centroids[:, d] = np.where(counts > 0, sums / np.maximum(counts, 1), centroids[:, d])
        for j in np.flatnonzero(counts == 0):  # an empty cluster takes the worst-fitted point
            error = distances[np.arange(points.shape[0]), members]
            worst = int(np.argmax(error))
            centroids[j] = points[worst]
            members[worst] = j
            distances[worst] = 0
    return centroids.astype(vectors.dtype)


def assign_vector_indices(vectors: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 index of the nearest (squared distance, float64) row of `table` for every row of
    `vectors` [N, V]; ties go to the lower index."""
    vectors = np.asarray(vectors)
    table = np.asarray(table, dtype=np.float64)
    out = np.empty(vectors.shape[0], np.uint8)
    step = max(1, _CHUNK // max(1, table.shape[0]))
    for start in range(0, vectors.shape[0], step):
        part = vectors[start : start + step].astype(np.float64)
        out[start : start + step] = _sq_distances(part, table).argmin(1)
    return out
