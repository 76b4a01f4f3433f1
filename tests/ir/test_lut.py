"""LUT fitting: exact histograms, locally optimal k-means close to the exact optimum, and the
nonzeros-only fit that spends no entry on zero."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from milsparse.ir import lut


def heavy_tailed(n, seed=0, dtype=np.float16, df=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(df, n) * 0.02).astype(dtype)


def optimal_sse(points, mass, k):
    """Exact 1-D weighted k-means by dynamic programming over sorted points, O(k n^2)."""
    n = points.size
    w, wx, wxx = (np.concatenate([[0], np.cumsum(a)]) for a in (mass, mass * points,
                                                                   mass * points**2))  # fmt: skip
    i, j = np.triu_indices(n + 1, 1)  # cluster = points[i:j]
    cost = np.full((n + 1, n + 1), np.inf)
    cost[i, j] = (wxx[j] - wxx[i]) - (wx[j] - wx[i]) ** 2 / (w[j] - w[i])
    best = cost[0].copy()
    for _ in range(1, k):
        best = np.minimum(best, np.min(best[:, None] + cost, axis=0))
    return best[n]


def sse(points, mass, centroids):
    nearest = np.abs(points[:, None] - centroids[None, :]).argmin(axis=1)
    return float((mass * (points - centroids[nearest]) ** 2).sum())


def test_fp16_histogram_is_exact():
    values = heavy_tailed(200_000)
    points, mass = lut.value_histogram(values)
    distinct, counts = np.unique(values.astype(np.float64), return_counts=True)
    np.testing.assert_array_equal(points, distinct)
    np.testing.assert_array_equal(mass, counts)


def test_fp32_bins_are_ordered_and_keep_each_bins_mean():
    values = heavy_tailed(300_000, dtype=np.float32)
    weights = np.random.default_rng(1).uniform(0.5, 2, values.size)
    points, mass = lut.value_histogram(values, weights)
    assert np.all(np.diff(points) > 0) and mass.sum() == pytest.approx(weights.sum())
    mean = (points * mass).sum() / mass.sum()
    assert mean == pytest.approx((values * weights).sum() / weights.sum(), rel=1e-9, abs=1e-15)
    assert points.size > 1000  # bins follow the values' magnitudes, not a few wide bins


@given(hnp.arrays(np.float16, st.integers(1, 40), elements=st.floats(-4, 4, width=16)),
       st.integers(1, 4))  # fmt: skip
def test_as_many_entries_as_distinct_values_reconstruct_exactly(values, nbits):
    if np.unique(values).size > 1 << nbits:
        return
    table = lut.fit_lut(values, nbits)
    indices = lut.assign_indices(values, table)
    np.testing.assert_array_equal(table[indices], values)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_kmeans_is_exactly_optimal_up_to_64_entries(seed, k):
    rng = np.random.default_rng(seed)
    points = np.unique(rng.standard_t(3, 60) + (seed % 2) * 1e3)  # also far from zero
    mass = rng.integers(1, 20, points.size).astype(np.float64)
    centroids = lut.kmeans_1d(points, mass, k)
    assert centroids.size == k and np.all(np.diff(centroids) >= 0)
    # the reference sums raw (uncentred) moments, so the two agree to rounding, about 1e-9
    assert sse(points, mass, centroids) == pytest.approx(optimal_sse(points, mass, k), rel=1e-6)


def test_lloyd_for_8_bit_tables_is_a_fixed_point():
    rng = np.random.default_rng(7)
    points = np.unique(rng.standard_t(3, 5000))
    mass = rng.integers(1, 20, points.size).astype(np.float64)
    centroids = lut.kmeans_1d(points, mass, 256)
    assert centroids.size == 256
    members = lut._nearest(centroids, points)
    for c in np.unique(members):  # every centroid is its members' weighted mean
        inside = members == c
        assert centroids[c] == pytest.approx(np.average(points[inside], weights=mass[inside]))


def test_kmeans_beats_uniform_on_heavy_tailed_weights():
    values = heavy_tailed(100_000)
    errors = {}
    for mode in ("kmeans", "uniform"):
        table = lut.fit_lut(values, 4, mode=mode)
        errors[mode] = lut.reconstruction_error(values, table, lut.assign_indices(values, table))
    assert errors["kmeans"] < errors["uniform"] / 3


def test_fitting_the_nonzeros_only_spends_no_entry_on_zero():
    """coremltools fits a sparse weight's LUT with its zeros, one entry wasted on 0; fitted on
    the nonzeros, the kept values are reconstructed better at the same bits."""
    values = heavy_tailed(50_000, seed=3).astype(np.float32)
    values[np.abs(values) < np.quantile(np.abs(values), 0.5)] = 0  # 50% pruned
    nonzero = values[values != 0]
    ours = lut.fit_lut(nonzero, 2)
    with_zeros = lut.fit_lut(values, 2)
    # fitted with the zeros, one entry lies closer to zero than any kept value: it serves only
    # the zeros, which the mask already stores
    smallest_kept = np.abs(nonzero).min()
    assert np.abs(ours).min() >= smallest_kept > np.abs(with_zeros).min()
    ours_err = lut.reconstruction_error(nonzero, ours, lut.assign_indices(nonzero, ours))
    theirs_err = lut.reconstruction_error(
        nonzero, with_zeros, lut.assign_indices(nonzero, with_zeros)
    )
    assert ours_err < theirs_err


def test_importance_moves_the_fit_toward_important_values():
    values = heavy_tailed(20_000, seed=4, dtype=np.float32)
    importance = np.where(np.arange(values.size) < 2000, 100.0, 1.0)
    plain = lut.fit_lut(values, 3)
    weighted = lut.fit_lut(values, 3, importance=importance)
    head = values[:2000]
    err = {
        name: lut.reconstruction_error(head, t, lut.assign_indices(head, t))
        for name, t in (("plain", plain), ("weighted", weighted))
    }
    assert err["weighted"] < err["plain"]


@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-10, 10, width=32)),
       st.integers(1, 5))  # fmt: skip
def test_assign_indices_picks_the_nearest_entry(values, nbits):
    table = lut.fit_lut(values, nbits)
    indices = lut.assign_indices(values, table)
    distance = np.abs(values[:, None].astype(np.float64) - table[None, :].astype(np.float64))
    np.testing.assert_array_equal(distance[np.arange(values.size), indices], distance.min(axis=1))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="nbits"):
        lut.fit_lut(np.ones(4, np.float16), 9)
    with pytest.raises(ValueError, match="mode"):
        lut.fit_lut(np.ones(4, np.float16), 2, mode="linear")
    with pytest.raises(ValueError, match="float16 or float32"):
        lut.value_histogram(np.ones(4, np.int8))
