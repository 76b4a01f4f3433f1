"""Sparse weight formats of Core ML's `constexpr_sparse_to_dense`, and their byte accounting.

Two encodings of one idea, a bit mask plus the kept values in row-major order:

- iOS16/iOS17: `mask` is uint8[ceil(N/8)] over the flattened weight, bits LSB-first, with a
  uint32 `shape` beside it;
- iOS18+: `mask` is uint1 with the weight's own shape (stored packed, one bit per element).

A weight's pruned form is `np.where(keep, w, 0)`. Zeros, of either sign, are never stored: the
encoders drop them from the mask, so decode(encode(w, keep)) is bit-identical to the pruned weight
(a kept -0.0 decodes to +0.0, which compares equal). Kept values are copied, never converted.

Byte accounting follows the weight file Core ML writes (checked against packages on disk in
tests): a 64-byte file header, then per tensor of 10 elements or more a 64-byte metadata record
and the data, each record starting on a 64-byte boundary. Smaller tensors are inlined into the
model proto and cost a few bytes there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from milsparse.ir.bits import pack_bits, unpack_bits
from milsparse.ir.masks import magnitude_keys

__all__ = [
    "SparseIOS16",
    "SparseIOS18",
    "encode_sparse_ios16",
    "decode_sparse_ios16",
    "encode_sparse_ios18",
    "decode_sparse_ios18",
    "pack_mask",
    "unpack_mask",
    "BLOB_ALIGNMENT",
    "BLOB_METADATA_BYTES",
    "BLOB_FILE_HEADER_BYTES",
    "INLINE_MAX_ELEMENTS",
    "tensor_storage_bytes",
    "dense_bytes",
    "sparse_bytes",
    "stored_bytes",
    "dense_tensors",
    "sparse_tensors",
    "SPARSE_VALUE_DTYPES",
]

BLOB_ALIGNMENT = 64
BLOB_METADATA_BYTES = 64
BLOB_FILE_HEADER_BYTES = 64
# coremltools writes a const to the weight file when it has at least this many elements.
INLINE_MAX_ELEMENTS = 9

# Value dtypes `constexpr_sparse_to_dense` accepts (int4/uint4 on iOS18 are not produced here).
SPARSE_VALUE_DTYPES = (
    np.dtype(np.float32),
    np.dtype(np.float16),
    np.dtype(np.int8),
    np.dtype(np.uint8),
)


@dataclass(frozen=True)
class SparseIOS16:
    """Operands of iOS16 `constexpr_sparse_to_dense`."""

    nonzero_data: np.ndarray  # T[D]
    mask: np.ndarray  # uint8[ceil(N / 8)], flattened row-major, LSB first
    shape: np.ndarray  # uint32[rank]


@dataclass(frozen=True)
class SparseIOS18:
    """Operands of iOS18 `constexpr_sparse_to_dense` (mask as 0/1 uint8 with the weight's shape)."""

    nonzero_data: np.ndarray  # T[D]
    mask: np.ndarray  # uint8 of 0/1, weight's shape; the pass tags it as MIL uint1


def _stored_mask(weight: np.ndarray, keep: np.ndarray | None, exact: bool = False) -> np.ndarray:
    """keep & (w != 0); `exact=True` promises `keep` already excludes every zero."""
    if keep is None:
        return weight != 0
    keep = np.asarray(keep, dtype=bool)
    if keep.shape != weight.shape:
        raise ValueError(f"mask shape {keep.shape} does not match weight shape {weight.shape}")
    return keep if exact else keep & (weight != 0)


# Elements per step of the value extraction: the flat index array np.compress builds stays in
# cache (a whole 16M-element weight's would be 8 bytes per kept element).
_EXTRACT_CHUNK = 1 << 18


def _kept_values(weight: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """weight[mask] for a bool mask of the weight's shape, a chunk at a time."""
    flat_w, flat_m = weight.reshape(-1), mask.reshape(-1)
    out = np.empty(int(np.count_nonzero(flat_m)), weight.dtype)
    at = 0
    for start in range(0, flat_w.size, _EXTRACT_CHUNK):
        part = np.compress(
            flat_m[start : start + _EXTRACT_CHUNK], flat_w[start : start + _EXTRACT_CHUNK]
        )
        out[at : at + part.size] = part
        at += part.size
    return out


def _mask_and_values(weight: np.ndarray, keep: np.ndarray | None, exact: bool):
    """(stored mask, kept values): `keep` minus the zeros, and the weight's values there.

    The zeros are looked for among the kept values (half the weight, or less) rather than in
    the whole weight; only when some are there does the mask take a pass over the weight."""
    if keep is None or exact:
        mask = _stored_mask(weight, keep, exact)
        return mask, _kept_values(weight, mask)
    mask = _stored_mask(weight, keep, exact=True)
    values = _kept_values(weight, mask)
    if not _all_nonzero(values):
        mask = mask & (weight != 0)
        values = values[values != 0]
    return mask, values


def _all_nonzero(values: np.ndarray) -> bool:
    """No element is 0 (or -0.0), tested on the magnitude keys (integer work: numpy compares
    float16 through float32), a chunk at a time."""
    flat = values.reshape(-1)
    return all(
        bool(np.all(magnitude_keys(flat[s : s + _EXTRACT_CHUNK])))
        for s in range(0, flat.size, _EXTRACT_CHUNK)
    )


def _check_dtype(weight: np.ndarray) -> None:
    if weight.dtype not in SPARSE_VALUE_DTYPES:
        raise ValueError(
            f"constexpr_sparse_to_dense stores fp32, fp16, int8 or uint8 values, got {weight.dtype}"
        )


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Pack a boolean mask row-major, LSB first, into uint8[ceil(N/8)]."""
    return pack_bits(np.asarray(mask, dtype=bool), 1)


def unpack_mask(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_mask`: a boolean array of `shape`."""
    count = int(np.prod(shape, dtype=np.int64))
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.size != (count + 7) // 8:
        raise ValueError(
            f"mask holds {packed.size} bytes, shape {tuple(shape)} needs {(count + 7) // 8}"
        )
    return unpack_bits(packed, 1, count).astype(bool).reshape(shape)


def encode_sparse_ios16(
    weight: np.ndarray, keep: np.ndarray | None = None, *, exact: bool = False
) -> SparseIOS16:
    """Encode `weight` (elements outside `keep` dropped) as iOS16 sparse operands."""
    weight = np.asarray(weight)
    _check_dtype(weight)
    mask, values = _mask_and_values(weight, keep, exact)
    return SparseIOS16(
        nonzero_data=values,
        mask=pack_mask(mask),
        shape=np.asarray(weight.shape, dtype=np.uint32),
    )


def decode_sparse_ios16(nonzero_data: np.ndarray, mask: np.ndarray, shape) -> np.ndarray:
    """Dense tensor from iOS16 sparse operands."""
    shape = tuple(int(d) for d in np.asarray(shape).ravel())
    bits = unpack_mask(mask, shape)
    return _scatter(np.asarray(nonzero_data), bits)


def encode_sparse_ios18(
    weight: np.ndarray, keep: np.ndarray | None = None, *, exact: bool = False
) -> SparseIOS18:
    """Encode `weight` (elements outside `keep` dropped) as iOS18 sparse operands."""
    weight = np.asarray(weight)
    _check_dtype(weight)
    mask, values = _mask_and_values(weight, keep, exact)
    return SparseIOS18(nonzero_data=values, mask=mask.view(np.uint8))


def decode_sparse_ios18(nonzero_data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dense tensor from iOS18 sparse operands (mask of 0/1 with the output's shape)."""
    return _scatter(np.asarray(nonzero_data), np.asarray(mask) != 0)


def _scatter(nonzero_data: np.ndarray, bits: np.ndarray) -> np.ndarray:
    if nonzero_data.ndim != 1:
        raise ValueError(f"nonzero_data must be 1-D, got shape {nonzero_data.shape}")
    count = int(np.count_nonzero(bits))
    if count != nonzero_data.size:
        raise ValueError(
            f"mask has {count} set bits but nonzero_data holds {nonzero_data.size} values"
        )
    out = np.zeros(bits.shape, dtype=nonzero_data.dtype)
    out[bits] = nonzero_data
    return out


def tensor_storage_bytes(num_elements: int, bits_per_element: int) -> int:
    """Bytes one tensor takes in the weight file: metadata plus data padded to the alignment.

    Tensors of fewer than 10 elements are inlined in the proto; they count their raw data.
    """
    data = (num_elements * bits_per_element + 7) // 8
    if num_elements <= INLINE_MAX_ELEMENTS:
        return data
    padded = -(-data // BLOB_ALIGNMENT) * BLOB_ALIGNMENT
    return BLOB_METADATA_BYTES + padded


def stored_bytes(tensors) -> int:
    """Storage of a weight kept as the tensors `[(element count, bits per element), ...]`: every
    form's bytes are this sum over the tensors it stores."""
    return sum(tensor_storage_bytes(count, bits) for count, bits in tensors)


def dense_tensors(num_elements: int, dtype) -> list[tuple[int, int]]:
    """The tensors of a dense `const` weight."""
    return [(num_elements, np.dtype(dtype).itemsize * 8)]


def sparse_tensors(
    num_elements: int, num_nonzero: int, value_bits: int, *, ios18: bool, rank: int = 2
) -> list[tuple[int, int]]:
    """The tensors of a `constexpr_sparse_to_dense` weight whose kept values take `value_bits`
    each: the values, the mask (iOS18: uint1 with the weight's shape; iOS16: packed uint8), and
    on iOS16 the uint32 shape. Joint forms store their values' tables beside these."""
    values = (num_nonzero, value_bits)
    if ios18:
        return [values, (num_elements, 1)]
    return [values, ((num_elements + 7) // 8, 8), (rank, 32)]


def dense_bytes(num_elements: int, dtype) -> int:
    """Storage of a dense `const` weight."""
    return stored_bytes(dense_tensors(num_elements, dtype))


def sparse_bytes(num_elements: int, num_nonzero: int, dtype, *, ios18: bool, rank: int = 2) -> int:
    """Storage of a `constexpr_sparse_to_dense` weight: values, mask, and (iOS16) the shape."""
    bits = np.dtype(dtype).itemsize * 8
    return stored_bytes(sparse_tensors(num_elements, num_nonzero, bits, ios18=ios18, rank=rank))


# -- decoders of the other constexpr formats (one per format; the interpreter calls these) ----


def decode_lut_ios16(lut: np.ndarray, indices: np.ndarray, shape) -> np.ndarray:
    """iOS16 `constexpr_lut_to_dense`: lut T[2^n], packed n-bit indices, uint32 shape."""
    shape = tuple(int(d) for d in np.asarray(shape).ravel())
    nbits = int(np.log2(np.asarray(lut).size))
    count = int(np.prod(shape, dtype=np.int64))
    return np.asarray(lut)[unpack_bits(indices, nbits, count)].reshape(shape)


def decode_lut_ios18(indices: np.ndarray, lut: np.ndarray, vector_axis=None) -> np.ndarray:
    """iOS18 `constexpr_lut_to_dense`: per-block LUTs `[*blocks, 2^n, V]` over `indices`.

    Axis i of `indices` is split into `lut.shape[i]` equal blocks, each with its own table; with
    V > 1 each index expands to V consecutive elements along `vector_axis`.
    """
    indices = np.asarray(indices).astype(np.intp)
    lut = np.asarray(lut)
    rank = indices.ndim
    grids = []
    for axis, (size, blocks) in enumerate(zip(indices.shape, lut.shape[:rank], strict=True)):
        shape = [1] * rank
        shape[axis] = size
        grids.append((np.arange(size) // (size // blocks)).reshape(shape))
    values = lut[tuple(grids) + (indices,)]  # indices.shape + (V,)
    vector = lut.shape[-1]
    if vector == 1:
        return values[..., 0]
    axis = int(vector_axis) % rank
    values = np.moveaxis(values, -1, axis + 1)
    out_shape = list(indices.shape)
    out_shape[axis] *= vector
    return values.reshape(out_shape)


def decode_affine_ios16(quantized: np.ndarray, zero_point, scale, axis: int) -> np.ndarray:
    """iOS16 `constexpr_affine_dequantize`: (q - zero_point) * scale, per channel on `axis`."""
    quantized = np.asarray(quantized)
    scale, zero_point = np.asarray(scale), np.asarray(zero_point)
    shape = [1] * quantized.ndim
    if scale.ndim and scale.size > 1:
        shape[int(axis)] = -1
    zp_shape = [1] * quantized.ndim
    if zero_point.ndim and zero_point.size > 1:
        zp_shape[int(axis)] = -1
    centered = quantized.astype(np.float32) - zero_point.astype(np.float32).reshape(zp_shape)
    return (centered * scale.astype(np.float32).reshape(shape)).astype(scale.dtype)


def _repeat_blocks(table: np.ndarray, shape) -> np.ndarray:
    for axis, (size, blocks) in enumerate(zip(shape, table.shape, strict=True)):
        if blocks != size:
            table = np.repeat(table, size // blocks, axis=axis)
    return table


def decode_blockwise_ios18(data: np.ndarray, scale: np.ndarray, offset=None) -> np.ndarray:
    """iOS18 `constexpr_blockwise_shift_scale`: (data - offset) * scale, block-wise."""
    data = np.asarray(data)
    scale = np.asarray(scale)
    out = data.astype(np.float32)
    if offset is not None:
        out = out - _repeat_blocks(np.asarray(offset).astype(np.float32), data.shape)
    return (out * _repeat_blocks(scale.astype(np.float32), data.shape)).astype(scale.dtype)
