import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from milsparse.ir import formats

DTYPES = [np.float32, np.float16, np.int8, np.uint8]


def _pruned(weight: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """The weight with every element outside `keep` (and every zero) set to +0."""
    kept = weight != 0 if keep is None else np.asarray(keep, bool) & (weight != 0)
    return np.where(kept, weight, np.zeros_like(weight))


def _bits(a: np.ndarray) -> np.ndarray:
    """A view whose equality is bit equality (so -0.0 != +0.0 and nan == nan)."""
    return a.view(f"u{a.dtype.itemsize}")


@st.composite
def weight_and_keep(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=9))
    if dtype.kind == "f":
        elements = st.floats(width=dtype.itemsize * 8, allow_nan=False, allow_infinity=False)
    else:
        elements = st.integers(np.iinfo(dtype).min, np.iinfo(dtype).max)
    weight = draw(hnp.arrays(dtype, shape, elements=elements))
    keep = draw(hnp.arrays(np.bool_, shape))
    return weight, keep


@given(weight_and_keep())
def test_ios16_roundtrip_is_the_pruned_weight_bit_for_bit(case):
    weight, keep = case
    enc = formats.encode_sparse_ios16(weight, keep)
    assert enc.mask.dtype == np.uint8 and enc.mask.size == (weight.size + 7) // 8
    assert enc.shape.dtype == np.uint32 and tuple(enc.shape) == weight.shape
    decoded = formats.decode_sparse_ios16(enc.nonzero_data, enc.mask, enc.shape)
    expected = _pruned(weight, keep)
    assert decoded.dtype == weight.dtype
    np.testing.assert_array_equal(_bits(decoded), _bits(expected))
    # kept nonzero values are stored unchanged
    np.testing.assert_array_equal(_bits(enc.nonzero_data), _bits(weight[keep & (weight != 0)]))


@given(weight_and_keep())
def test_ios18_roundtrip_is_the_pruned_weight_bit_for_bit(case):
    weight, keep = case
    enc = formats.encode_sparse_ios18(weight, keep)
    assert enc.mask.shape == weight.shape and set(np.unique(enc.mask)) <= {0, 1}
    decoded = formats.decode_sparse_ios18(enc.nonzero_data, enc.mask)
    np.testing.assert_array_equal(_bits(decoded), _bits(_pruned(weight, keep)))


@given(weight_and_keep())
def test_encodings_agree_with_coremltools_decoders(case):
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import (
        constexpr_sparse_to_dense as ios16_op,
    )
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (
        constexpr_sparse_to_dense as ios18_op,
    )

    weight, keep = case
    expected = _pruned(weight, keep)
    e16 = formats.encode_sparse_ios16(weight, keep)
    e18 = formats.encode_sparse_ios18(weight, keep)
    np.testing.assert_array_equal(
        ios16_op.decompress(e16.nonzero_data, e16.mask, e16.shape), expected
    )
    np.testing.assert_array_equal(ios18_op.decompress(e18.nonzero_data, e18.mask), expected)


def test_mask_bits_are_row_major_lsb_first():
    # coremltools' documented example: shape (5,), elements 2 and 3 set -> byte 0b00001100
    weight = np.array([0, 0, 1.5, -2.0, 0], dtype=np.float32)
    enc = formats.encode_sparse_ios16(weight)
    assert enc.mask.tolist() == [0b00001100]
    assert enc.nonzero_data.tolist() == [1.5, -2.0]
    two_d = np.arange(1, 17, dtype=np.float32).reshape(2, 8)
    keep = np.zeros((2, 8), bool)
    keep[0, 0] = keep[1, 7] = True
    assert formats.encode_sparse_ios16(two_d, keep).mask.tolist() == [0b00000001, 0b10000000]


def test_zeros_are_never_stored_and_negative_zero_decodes_to_zero():
    weight = np.array([[-0.0, 1.0], [0.0, -3.0]], dtype=np.float16)
    enc = formats.encode_sparse_ios18(weight, np.ones_like(weight, dtype=bool))
    assert enc.nonzero_data.tolist() == [1.0, -3.0]
    decoded = formats.decode_sparse_ios18(enc.nonzero_data, enc.mask)
    assert not np.signbit(decoded[0, 0])


def test_decoders_reject_inconsistent_operands():
    with pytest.raises(ValueError, match="set bits"):
        formats.decode_sparse_ios18(np.ones(3, np.float32), np.array([[1, 0], [0, 1]], np.uint8))
    with pytest.raises(ValueError, match="bytes"):
        formats.decode_sparse_ios16(np.ones(1, np.float32), np.zeros(3, np.uint8), [4, 2])
    with pytest.raises(ValueError, match="stores fp32"):
        formats.encode_sparse_ios18(np.ones((2, 2), np.float64))
    with pytest.raises(ValueError, match="mask shape"):
        formats.encode_sparse_ios18(np.ones((2, 2), np.float32), np.ones((4,), bool))


def test_tensor_storage_bytes():
    assert formats.tensor_storage_bytes(9, 32) == 36  # inlined in the proto
    assert formats.tensor_storage_bytes(10, 16) == 64 + 64
    assert formats.tensor_storage_bytes(32, 16) == 64 + 64
    assert formats.tensor_storage_bytes(33, 16) == 64 + 128
    assert formats.tensor_storage_bytes(1000, 1) == 64 + 128  # 125 bytes of packed bits


@given(
    n=st.integers(16, 10**6),
    sparsity=st.floats(0, 1),
    dtype=st.sampled_from([np.float16, np.float32]),
)
def test_sparse_cost_follows_one_plus_kept_bits_per_weight(n, sparsity, dtype):
    nnz = int(round(n * (1 - sparsity)))
    bits = np.dtype(dtype).itemsize * 8
    cost = formats.sparse_bytes(n, nnz, dtype, ios18=True)
    ideal = (n + nnz * bits) / 8
    assert ideal <= cost <= ideal + 4 * 64
    # iOS16 adds the uint32 shape (inlined) and may inline a mask of 9 bytes or fewer
    cost16 = formats.sparse_bytes(n, nnz, dtype, ios18=False)
    assert nnz * bits / 8 <= cost16 <= ideal + 4 * 64 + 8


def test_fp16_needs_more_than_one_sixteenth_sparsity_to_pay_off():
    n = 1 << 16
    dense = formats.dense_bytes(n, np.float16)
    assert formats.sparse_bytes(n, n - n // 32, np.float16, ios18=True) > dense
    assert formats.sparse_bytes(n, n - n // 8, np.float16, ios18=True) < dense
