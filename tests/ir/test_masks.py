import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from milsparse.ir import masks
from milsparse.ir.masks import round_half_up


@st.composite
def tied_weights(draw, min_dims=1, max_dims=4, max_side=12):
    """Weights from a small value set, so ties at the selection boundary are common."""
    shape = draw(
        hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side)
    )
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    values = st.sampled_from([0.0, -0.5, 0.5, 1.0, -1.0, 2.0, 0.25])
    return draw(hnp.arrays(dtype, shape, elements=values))


def test_round_half_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.49, 0.0)] == [1, 2, 3, 2, 0]


@given(
    scores=hnp.arrays(np.float32, st.integers(1, 200), elements=st.sampled_from([0.0, 1.0, 2.0])),
    data=st.data(),
)
def test_select_lowest_takes_exactly_k_and_breaks_ties_by_index(scores, data):
    k = data.draw(st.integers(0, scores.size))
    chosen = masks.select_lowest(scores, k)
    assert chosen.sum() == k
    if 0 < k < scores.size:
        assert scores[chosen].max() <= scores[~chosen].min()
        boundary = scores[chosen].max()
        tied = np.flatnonzero(scores == boundary)
        taken = chosen[tied]
        # among tied elements the taken ones form a prefix in index order
        assert not np.any(~taken[:-1] & taken[1:])


@given(weight=tied_weights(), sparsity=st.floats(0, 1))
def test_magnitude_prunes_exactly_round_sparsity_n(weight, sparsity):
    keep = masks.magnitude_mask(weight, sparsity)
    assert keep.shape == weight.shape
    assert (~keep).sum() == round_half_up(sparsity * weight.size)
    mags = np.abs(weight.astype(np.float32))
    if keep.any() and (~keep).any():
        assert mags[~keep].max() <= mags[keep].min()
    np.testing.assert_array_equal(keep, masks.magnitude_mask(weight.copy(), sparsity))


def test_magnitude_on_large_fp16_uses_float32_order_statistics():
    # numpy's percentile of a float16 array longer than 65504 returns nan (numpy 2.x), which is
    # how coremltools prunes nothing on big fp16 weights; the selection here never works in fp16.
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((7, 10_001)).astype(np.float16)
    for sparsity in (0.25, 0.5, 0.9):
        keep = masks.magnitude_mask(weight, sparsity)
        assert (~keep).sum() == round_half_up(sparsity * weight.size)
        mags = np.abs(weight.astype(np.float64))
        assert mags[~keep].max() <= mags[keep].min()


def test_threshold_zeroes_at_or_below_t():
    w = np.array([[-0.1, 0.05, 0.1, 0.2]], np.float16)
    keep = masks.threshold_mask(w, 0.1)
    expected = np.abs(w.astype(np.float32)) > np.float32(0.1)
    np.testing.assert_array_equal(keep, expected)
    with pytest.raises(ValueError):
        masks.threshold_mask(w, -1)


@st.composite
def block_case(draw):
    rank = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=rank, max_size=rank)))
    weight = draw(hnp.arrays(np.float32, shape, elements=st.floats(-4, 4, width=32)))
    return weight, draw(st.integers(1, 5)), draw(st.sampled_from([0, 1])), draw(st.floats(0, 1))


@given(block_case())
def test_block_prunes_whole_blocks_exactly(case):
    weight, block_size, axis, sparsity = case
    keep = masks.block_mask(weight, sparsity, block_size, axis)
    moved = np.moveaxis(keep, axis, 0)
    channels = moved.shape[0]
    nblocks = -(-channels // block_size)
    pruned_blocks = 0
    for b in range(nblocks):
        block = moved[b * block_size : (b + 1) * block_size]
        # each block position is all kept or all pruned across its channels
        assert np.all(block == block[:1])
        pruned_blocks += int((~block[0]).sum())
    per_block = int(np.prod(moved.shape[1:]))
    assert pruned_blocks == round_half_up(sparsity * nblocks * per_block)


def test_block_scores_by_l2_norm_and_short_tail_is_scaled():
    # axis 0 has 5 channels, blocks of 2: blocks {0,1}, {2,3}, {4} (short)
    w = np.array([[3.0], [4.0], [0.1], [0.1], [2.0]], np.float32)
    keep = masks.block_mask(w, 1 / 3, 2, axis=0)
    np.testing.assert_array_equal(keep[:, 0], [True, True, False, False, True])
    # the lone 2.0 scales to norm 2*sqrt(2) ~ 2.83 < 5.0: with two blocks pruned it goes next
    keep = masks.block_mask(w, 2 / 3, 2, axis=0)
    np.testing.assert_array_equal(keep[:, 0], [True, True, False, False, False])


@st.composite
def nm_case(draw):
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 11), min_size=rank, max_size=rank)))
    m = draw(st.integers(1, 8))
    n = draw(st.integers(0, m))
    # distinct nonzero magnitudes: every pruned position is visible as a zero
    weight = draw(hnp.arrays(np.float32, shape, elements=st.floats(0.015625, 4, width=32)))
    sign = draw(hnp.arrays(np.bool_, shape))
    return np.where(sign, -weight, weight), n, m, draw(st.integers(0, rank - 1))


@given(nm_case())
def test_nm_has_n_zeros_in_every_group_and_tail_in_proportion(case):
    weight, n, m, axis = case
    keep = masks.nm_mask(weight, n, m, axis)
    rows = np.moveaxis(keep, axis, -1).reshape(-1, weight.shape[axis])
    mags = np.abs(np.moveaxis(weight, axis, -1).reshape(rows.shape))
    length = rows.shape[1]
    for start in range(0, length, m):
        group = rows[:, start : start + m]
        expected = n if group.shape[1] == m else round_half_up(n * group.shape[1] / m)
        assert np.all((~group).sum(axis=1) == expected)
        g = mags[:, start : start + m]
        for r in range(group.shape[0]):
            if group[r].any() and (~group[r]).any():
                assert g[r][~group[r]].max() <= g[r][group[r]].min()


def test_nm_groups_run_along_the_given_axis():
    w = np.array([[1.0, 2.0, 3.0, 4.0], [8.0, 7.0, 6.0, 5.0]], np.float32)
    np.testing.assert_array_equal(masks.nm_mask(w, 2, 4, axis=1), [[0, 0, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(masks.nm_mask(w, 1, 2, axis=0), [[0, 0, 0, 0], [1, 1, 1, 1]])


def test_nm_tail_is_pruned_in_proportion_where_coremltools_underprunes():
    # 3:4 over 10 input channels: two full groups (3 zeros each) and a tail of 2 (round(1.5) = 2)
    w = np.arange(1, 11, dtype=np.float32)[None, :]
    keep = masks.nm_mask(w, 3, 4, axis=1)
    assert (~keep).sum() == 3 + 3 + 2


def test_nm_ties_go_to_the_lower_index():
    w = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(masks.nm_mask(w, 2, 4, axis=1), [[False, False, True, True]])


def test_structured_masks_reject_bad_arguments():
    w = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError):
        masks.nm_mask(w, 5, 4)
    with pytest.raises(ValueError):
        masks.nm_mask(np.ones(8, np.float32), 2, 4)
    with pytest.raises(ValueError):
        masks.block_mask(w, 0.5, 0)
    with pytest.raises(ValueError):
        masks.magnitude_mask(w, 1.5)


def test_data_aware_scores_replace_magnitude():
    w = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    scores = np.array([[4.0, 3.0, 2.0, 1.0]], np.float32)
    np.testing.assert_array_equal(masks.magnitude_mask(w, 0.5, scores), [[1, 1, 0, 0]])
    np.testing.assert_array_equal(masks.nm_mask(w, 2, 4, 1, scores), [[1, 1, 0, 0]])


@given(
    weight=st.one_of(
        tied_weights(max_dims=2, max_side=80),
        hnp.arrays(np.float32, st.integers(1, 3000), elements=st.floats(-8, 8, width=32)),
    ),
    data=st.data(),
)
def test_both_kth_key_selectors_agree_with_a_sort(weight, data):
    flat = weight.ravel()
    k = data.draw(st.integers(1, flat.size))
    keys = np.sort(masks.magnitude_keys(flat))
    kth = int(keys[k - 1])
    expected = (kth, k - int(np.count_nonzero(keys < kth)))
    assert masks._kth_smallest_key(flat, k) == expected
    bracketed = masks._kth_key_by_bracket(flat, k)
    assert bracketed is None or bracketed == expected


def test_magnitude_keys_order_like_absolute_values():
    w = np.array([-0.0, 0.0, 1e-8, -1e-8, 0.5, -2.0, 65504.0], np.float16)
    keys = masks.magnitude_keys(w)
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(np.abs(w.astype(np.float64))[order]) >= 0)
    assert keys[0] == keys[1] == 0
    assert masks.all_finite(w) and not masks.all_finite(np.array([1.0, np.inf], np.float32))


@pytest.mark.parametrize("scale", [1e-24, 1e21, 1e-40])
def test_block_scores_rank_by_norm_at_any_float32_scale(scale):
    """Probe finding 14: squares of fp32 weights near 1e-24 underflow and near 1e21 overflow
    float32, so every block scored 0 (or inf) and blocks were chosen by position."""
    rng = np.random.default_rng(0)
    norms = rng.permutation(np.arange(1, 9, dtype=np.float64))  # block i's magnitude
    weight = (np.repeat(norms, 4)[:, None] * np.ones((1, 16)) * scale).astype(np.float32)
    assert np.all(np.isfinite(weight)) and np.all(weight > 0)
    keep = masks.block_mask(weight, 0.5, 4, axis=0)
    pruned_blocks = ~keep[::4, 0]
    assert set(norms[pruned_blocks]) == {1, 2, 3, 4}


def test_threshold_compares_in_float64_as_the_readme_says():
    """Probe finding 15: float32(0.1) = 0.10000000149 > 0.1 must be kept by threshold 0.1."""
    w = np.array([[0.1, -0.1, 0.05, 0.2]], dtype=np.float32)
    keep = masks.threshold_mask(w, 0.1)
    assert keep.tolist() == [[True, True, False, True]]
    assert masks.threshold_mask(w, float(np.float32(0.1))).tolist() == [[False, False, False, True]]
    h = np.array([[0.1, 0.0999]], dtype=np.float16)  # fp16(0.1) = 0.0999755859375 < 0.1
    assert masks.threshold_mask(h, 0.1).tolist() == [[False, False]]


@st.composite
def per_channel_case(draw):
    weight = draw(tied_weights(min_dims=2, max_dims=4, max_side=9))
    axis = draw(st.integers(0, weight.ndim - 1))
    return weight, axis, draw(st.floats(0, 1))


@given(per_channel_case())
def test_channel_scope_prunes_exactly_k_lowest_in_every_slice(case):
    weight, axis, sparsity = case
    keep = masks.magnitude_mask(weight, sparsity, axis=axis)
    rows = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    kept = np.moveaxis(keep, axis, 0).reshape(rows.shape)
    k = round_half_up(sparsity * rows.shape[1])
    for row, row_keep in zip(rows, kept, strict=True):
        # the same choice as a whole-tensor selection over this one row
        expected = ~masks.magnitude_mask(row[None], sparsity)[0]
        assert (~row_keep).sum() == k
        np.testing.assert_array_equal(~row_keep, expected)
