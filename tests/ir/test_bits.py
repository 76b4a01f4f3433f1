"""The one sub-byte packer: round trips at every width, pieces that concatenate, and the same
bytes as coremltools' own packer (what Core ML reads)."""

import numpy as np
import pytest
from coremltools.optimize._utils import pack_elements_into_bits, restore_elements_from_packed_bits
from hypothesis import given, settings
from hypothesis import strategies as st
from milsparse.ir.bits import SUB_BYTE_BITS, pack_bits, packed_bytes, unpack_bits

WIDTHS = (1, 2, 3, 4, 6, 8)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(WIDTHS), st.integers(0, 200), st.integers(0, 2**32 - 1))
def test_round_trip_and_coremltools_bytes(bits, count, seed):
    values = np.random.default_rng(seed).integers(0, 1 << bits, count).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_bytes(count, bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), values)
    if count:
        np.testing.assert_array_equal(packed, pack_elements_into_bits(values, bits))
        restored = restore_elements_from_packed_bits(packed, bits, count)
        np.testing.assert_array_equal(restored, values)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(WIDTHS), st.integers(0, 5), st.integers(0, 40), st.integers(0, 99))
def test_pieces_of_multiples_of_eight_concatenate(bits, whole_bytes, tail, seed):
    values = np.random.default_rng(seed).integers(0, 1 << bits, 8 * whole_bytes + tail)
    values = values.astype(np.uint8)
    cut = 8 * whole_bytes
    pieces = np.concatenate([pack_bits(values[:cut], bits), pack_bits(values[cut:], bits)])
    np.testing.assert_array_equal(pieces, pack_bits(values, bits))


def test_only_the_low_bits_are_kept_and_int4_is_twos_complement():
    assert pack_bits(np.array([0xFF, 0x10], np.uint8), 4).tolist() == [0x0F]
    assert pack_bits(np.array([-1, 1], np.int8), 4).tolist() == [0x1F]
    assert SUB_BYTE_BITS["int4"] == 4 and SUB_BYTE_BITS["uint1"] == 1


def test_unpacking_from_too_few_bytes_is_refused():
    with pytest.raises(ValueError, match="fewer than 9 values of 1 bits"):
        unpack_bits(np.zeros(1, np.uint8), 1, 9)
