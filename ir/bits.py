"""Sub-byte values packed least significant bit first: the one packer, unpacker and width table.

MIL stores uint1/2/3/4/6 and int4 tensors (masks, palette indices) packed, element after
element, each element's bits from least to most significant, the last byte's unused high bits
zero. The weight-file writer (`blobs`), the iOS16 sparse masks and LUT indices (`formats`) and
the byte accounting (`chain`) all read and write that one layout through this module.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SUB_BYTE_BITS", "pack_bits", "unpack_bits", "packed_bytes"]

# Bits per element of MIL's sub-byte types, by type name.
SUB_BYTE_BITS = {"int4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6}


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that `count` elements of `bits` each take packed."""
    return -(-int(count) * int(bits) // 8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes of `values` (unsigned, bool, or int4 two's complement), `bits` wide each.

    `values` is read flat (row-major); only each element's low `bits` bits are kept. Cut into
    pieces whose lengths are multiples of 8, the pieces' packings concatenate to the whole's.
    """
    v = np.asarray(values).ravel()
    v = v.view(np.uint8) if v.dtype.itemsize == 1 and v.dtype != np.uint8 else v
    v = np.asarray(v, dtype=np.uint8)
    if bits == 8:
        return v.copy()
    if bits == 1:
        return np.packbits(v & np.uint8(1), bitorder="little")
    if bits in (2, 4):
        per = 8 // bits
        pad = -v.size % per
        if pad:
            v = np.concatenate([v, np.zeros(pad, np.uint8)])
        v = v.reshape(-1, per) & np.uint8((1 << bits) - 1)
        out = v[:, 0].copy()
        for i in range(1, per):
            out |= v[:, i] << np.uint8(i * bits)
        return out
    expanded = np.unpackbits(v[:, None], axis=1, count=bits, bitorder="little")
    return np.packbits(expanded.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` elements of `bits` each in `packed` (the inverse of `pack_bits`), as
    uint8; a ValueError when `packed` holds too few bytes."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    if packed.size < packed_bytes(count, bits):
        raise ValueError(
            f"{packed.size} bytes hold fewer than {count} values of {bits} bits "
            f"({packed_bytes(count, bits)} bytes needed)"
        )
    if bits == 8:
        return packed[:count].copy()
    if bits == 1:
        return np.unpackbits(packed, count=count, bitorder="little")
    expanded = np.unpackbits(packed, count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return (expanded.reshape(count, bits).astype(np.uint16) @ weights).astype(np.uint8)
