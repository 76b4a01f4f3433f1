"""Every constexpr kernel agrees with coremltools' own decompress on random parameters."""

import numpy as np
from coremltools.converters.mil.mil.ops.defs.iOS16 import constexpr_ops as ios16
from coremltools.converters.mil.mil.ops.defs.iOS18 import compression as ios18
from coremltools.optimize._utils import pack_elements_into_bits
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from milsparse.ir.interpreter import KERNELS, load_kernels

load_kernels()


def _run(op_type, **inputs):
    return KERNELS[op_type](None, inputs, None)


shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6)
float_dtypes = st.sampled_from([np.float16, np.float32])


@given(shape=shapes, dtype=float_dtypes, data=st.data())
def test_sparse_to_dense_both_forms(shape, dtype, data):
    mask = data.draw(hnp.arrays(np.bool_, shape))
    nonzero = data.draw(hnp.arrays(dtype, int(mask.sum()), elements=st.floats(-4, 4, width=16)))
    ours18 = _run("constexpr_sparse_to_dense", nonzero_data=nonzero, mask=mask.astype(np.uint8))
    np.testing.assert_array_equal(
        ours18, ios18.constexpr_sparse_to_dense.decompress(nonzero, mask.astype(np.uint8))
    )
    packed = np.packbits(mask.ravel(), bitorder="little")
    ours16 = _run(
        "constexpr_sparse_to_dense",
        nonzero_data=nonzero,
        mask=packed,
        shape=np.array(shape, np.uint32),
    )
    np.testing.assert_array_equal(
        ours16, ios16.constexpr_sparse_to_dense.decompress(nonzero, packed, shape)
    )


@given(shape=shapes, nbits=st.sampled_from([1, 2, 4, 6, 8]), dtype=float_dtypes, data=st.data())
def test_lut_to_dense_ios16(shape, nbits, dtype, data):
    count = int(np.prod(shape))
    indices = data.draw(hnp.arrays(np.uint8, count, elements=st.integers(0, 2**nbits - 1)))
    lut = data.draw(hnp.arrays(dtype, 2**nbits, elements=st.floats(-4, 4, width=16)))
    packed = pack_elements_into_bits(indices, nbits)
    ours = _run("constexpr_lut_to_dense", lut=lut, indices=packed, shape=np.array(shape, np.uint32))
    np.testing.assert_array_equal(ours, ios16.constexpr_lut_to_dense.decompress(lut, packed, shape))


@st.composite
def blocked_lut(draw):
    rank = draw(st.integers(1, 3))
    blocks = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    per_block = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    shape = [b * p for b, p in zip(blocks, per_block, strict=True)]
    nbits = draw(st.sampled_from([1, 2, 3, 4]))
    vector = draw(st.sampled_from([1, 2, 3]))
    indices = draw(hnp.arrays(np.uint8, shape, elements=st.integers(0, 2**nbits - 1)))
    lut = draw(
        hnp.arrays(np.float32, blocks + [2**nbits, vector], elements=st.floats(-4, 4, width=32))
    )
    axis = draw(st.integers(0, rank - 1)) if vector > 1 else None
    return indices, lut, axis


@given(blocked_lut())
def test_lut_to_dense_ios18_blocks_and_vectors(case):
    indices, lut, axis = case
    ours = _run("constexpr_lut_to_dense", indices=indices, lut=lut, vector_axis=axis)
    np.testing.assert_array_equal(ours, ios18.constexpr_lut_to_dense.decompress(indices, lut, axis))


@given(blocked_lut(), st.data())
def test_lut_to_sparse_ios18(case, data):
    indices, lut, axis = case
    mask = data.draw(hnp.arrays(np.bool_, indices.shape)).astype(np.uint8)
    nonzero = indices[mask != 0]
    ours = _run(
        "constexpr_lut_to_sparse",
        indices_mask=mask,
        indices_nonzero_data=nonzero,
        lut=lut,
        vector_axis=axis,
    )
    theirs = ios18.constexpr_lut_to_sparse.decompress(mask, nonzero, lut, axis)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1], theirs[1])


@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=6), signed=st.booleans(), data=st.data()
)
def test_affine_dequantize_ios16(shape, signed, data):
    dtype = np.int8 if signed else np.uint8
    info = np.iinfo(dtype)
    q = data.draw(hnp.arrays(dtype, shape, elements=st.integers(info.min, info.max)))
    axis = data.draw(st.integers(0, len(shape) - 1))
    per_channel = data.draw(st.booleans())
    n = shape[axis] if per_channel else 1
    scale = data.draw(hnp.arrays(np.float32, n, elements=st.floats(0.015625, 2, width=32)))
    zero_point = data.draw(hnp.arrays(dtype, n, elements=st.integers(info.min, info.max)))
    if not per_channel:
        scale, zero_point = scale[0], zero_point[0]
    ours = _run(
        "constexpr_affine_dequantize",
        quantized_data=q,
        zero_point=zero_point,
        scale=scale,
        axis=axis,
    )
    theirs = ios16.constexpr_affine_dequantize.decompress(q, zero_point, scale, axis)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


@st.composite
def blockwise(draw):
    rank = draw(st.integers(1, 3))
    blocks = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    per_block = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
    shape = [b * p for b, p in zip(blocks, per_block, strict=True)]
    dtype = draw(st.sampled_from([np.int8, np.uint8]))
    info = np.iinfo(dtype)
    data = draw(hnp.arrays(dtype, shape, elements=st.integers(info.min, info.max)))
    scale = draw(hnp.arrays(draw(float_dtypes), blocks, elements=st.floats(0.015625, 2, width=16)))
    offset = draw(
        st.one_of(st.none(), hnp.arrays(dtype, blocks, elements=st.integers(info.min, info.max)))
    )
    return data, scale, offset


@given(blockwise())
def test_blockwise_shift_scale_ios18(case):
    data, scale, offset = case
    ours = _run("constexpr_blockwise_shift_scale", data=data, scale=scale, offset=offset)
    theirs = ios18.constexpr_blockwise_shift_scale.decompress(data, scale, offset)
    assert ours.dtype == theirs.dtype
    np.testing.assert_allclose(
        ours.astype(np.float32), theirs.astype(np.float32), rtol=1e-3, atol=1e-3
    )


@given(blockwise(), st.data())
def test_sparse_blockwise_shift_scale_ios18(case, data):
    dense, scale, offset = case
    mask = data.draw(hnp.arrays(np.bool_, dense.shape)).astype(np.uint8)
    nonzero = dense[mask != 0]
    ours = _run(
        "constexpr_sparse_blockwise_shift_scale",
        data_mask=mask,
        nonzero_data=nonzero,
        scale=scale,
        offset=offset,
    )
    theirs = ios18.constexpr_sparse_blockwise_shift_scale.decompress(mask, nonzero, scale, offset)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_allclose(
        ours[1].astype(np.float32), theirs[1].astype(np.float32), rtol=1e-3, atol=1e-3
    )


@given(
    hnp.arrays(np.float16, hnp.array_shapes(max_dims=3), elements=st.floats(-100, 100, width=16))
)
def test_constexpr_cast(values):
    ours = _run("constexpr_cast", source_val=values, output_dtype="fp32")
    np.testing.assert_array_equal(ours, values.astype(np.float32))
