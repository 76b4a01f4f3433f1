"""milsparse's weight-file writer against coremltools' own, and file-backed values."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from milsparse.ir import blobs

BlobStorageWriter = pytest.importorskip("coremltools.libmilstoragepython")._BlobStorageWriter

# type name -> (numpy dtype of the values, value range, coremltools writer method)
TYPES = {
    "fp16": (np.float16, None, "write_fp16_data"),
    "fp32": (np.float32, None, "write_float_data"),
    "uint8": (np.uint8, (0, 256), "write_uint8_data"),
    "int8": (np.int8, (-128, 128), "write_int8_data"),
    "int16": (np.int16, (-(2**15), 2**15), "write_int16_data"),
    "uint16": (np.uint16, (0, 2**16), "write_uint16_data"),
    "int32": (np.int32, (-(2**31), 2**31), "write_int32_data"),
    "uint32": (np.uint32, (0, 2**32), "write_uint32_data"),
    "uint1": (np.uint8, (0, 2), "write_uint1_data"),
    "uint2": (np.uint8, (0, 4), "write_uint2_data"),
    "uint3": (np.uint8, (0, 8), "write_uint3_data"),
    "uint4": (np.uint8, (0, 16), "write_uint4_data"),
    "uint6": (np.uint8, (0, 64), "write_uint6_data"),
    "int4": (np.int8, (-8, 8), "write_int4_data"),
}


def _values(rng, type_name, size):
    dtype, bounds, _ = TYPES[type_name]
    if bounds is None:
        return rng.standard_normal(size).astype(dtype)
    return rng.integers(*bounds, size=size, dtype=np.int64).astype(dtype)


def _reference(path, tensors):
    writer = BlobStorageWriter(str(path))
    offsets = []
    for type_name, values in tensors:
        method = getattr(writer, TYPES[type_name][2])
        if type_name == "fp16":
            values = values.view(np.uint16)
        offsets.append(method(np.ascontiguousarray(values)))
    del writer
    return offsets


@settings(max_examples=40, deadline=None)
@given(
    tensors=st.lists(
        st.tuples(st.sampled_from(sorted(TYPES)), st.integers(1, 300)), min_size=1, max_size=6
    ),
    seed=st.integers(0, 2**16),
    mapped=st.booleans(),
)
def test_the_writer_writes_coremltools_bytes(tmp_path_factory, tensors, seed, mapped):
    """Any sequence of tensors of every type, from memory or from a memory-mapped file,
    gives the very file coremltools' BlobStorageWriter gives, at the same offsets."""
    folder = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(seed)
    values = [(name, _values(rng, name, size)) for name, size in tensors]
    expected = _reference(folder / "reference.bin", values)
    if mapped:  # the values as maps of a scratch file: copied kernel to kernel, or read packed
        spill = blobs.Spill(folder / "spill", min_bytes=0)
        values = [(name, spill.put(v)) for name, v in values]
        assert all(blobs.file_region(v) is not None for _, v in values)
    writer = blobs.BlobWriter(folder / "ours.bin")
    offsets = [writer.write(v, name) for name, v in values]
    writer.close()
    assert offsets == expected
    assert (folder / "ours.bin").read_bytes() == (folder / "reference.bin").read_bytes()


def test_packing_crosses_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(blobs, "_PACK_CHUNK", 16)
    rng = np.random.default_rng(1)
    values = [(name, _values(rng, name, 203)) for name in ("uint1", "uint3", "int4", "uint6")]
    expected = _reference(tmp_path / "reference.bin", values)
    spill = blobs.Spill(tmp_path / "spill", min_bytes=0)
    writer = blobs.BlobWriter(tmp_path / "ours.bin")
    offsets = [writer.write(spill.put(v) if i % 2 else v, n) for i, (n, v) in enumerate(values)]
    writer.close()
    assert offsets == expected
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "reference.bin").read_bytes()


def test_spill_maps_values_once_and_leaves_small_ones_in_memory(tmp_path):
    spill = blobs.Spill(tmp_path, min_bytes=1024)
    big = np.arange(1000, dtype=np.float32).reshape(10, 100)
    small = np.arange(10, dtype=np.float32)
    mapped = spill.put(big)
    assert isinstance(mapped, np.memmap) and mapped.shape == big.shape
    np.testing.assert_array_equal(mapped, big)
    assert spill.put(big) is mapped  # the same array, the same map
    assert spill.put(small) is small
    path, offset = blobs.file_region(mapped)
    assert path == spill.path and offset % 64 == 0
    second = spill.put(big + 1)
    assert blobs.file_region(second)[1] == 4000 + 32  # the next 64-byte boundary
    assert blobs.file_region(second[1:]) is not None  # a contiguous view of a map
    assert blobs.file_region(second[:, ::2]) is None  # not contiguous: written from memory
    spill.close()
    assert not list(tmp_path.iterdir())
    np.testing.assert_array_equal(second, big + 1)  # maps outlive the file's name
