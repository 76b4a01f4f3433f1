"""Core ML weight files (`weight.bin`) written by milsparse, and file-backed weight values.

The format is coremltools' (MILBlob storage, version 2), written byte for byte as its own
writer does (tested against it for every type):

- a 64-byte header: the record count (uint32), the version 2 (uint32), zeros;
- per tensor, at a 64-byte boundary, a 64-byte record: sentinel 0xDEADBEEF (uint32), the type
  code (uint32), the data's size in bytes, its offset, the unused bits of its last byte (uint64
  each), zeros; the data right after it. Sub-byte types (uint1/2/3/4/6, int4) are packed
  least significant bit first; nothing pads the last record's data.

`read_blob` maps one tensor of a weight file read-only (loading copies nothing).
`BlobWriter` writes from memory or straight from a region of another file (a weight that is a
view of a memory-mapped file: an input weight left as it was, or a value spilled to disk):
such bytes move with `os.copy_file_range`, kernel to kernel, so they never enter the process's
memory. `Spill` is where passes put the values they produce when they run on a saved model: a
scratch file, and a read-only memory map of each value in place of the array, so a program's
new weights cost page cache, not resident memory, until they are written.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
from milsparse.ir.bits import SUB_BYTE_BITS, pack_bits, packed_bytes
from milsparse.ir.errors import UnsupportedModelError

__all__ = [
    "BlobWriter",
    "Spill",
    "read_blob",
    "BYTE_DTYPES",
    "file_region",
    "release_pages",
    "TYPE_CODES",
]

HEADER_BYTES = 64
RECORD_BYTES = 64
ALIGNMENT = 64
SENTINEL = 0xDEADBEEF
VERSION = 2

# MILBlob's type codes, by MIL type name.
TYPE_CODES = {
    "fp16": 1, "fp32": 2, "uint8": 3, "int8": 4, "bf16": 5, "int16": 6, "uint16": 7,
    "int4": 8, "uint1": 9, "uint2": 10, "uint4": 11, "uint3": 12, "uint6": 13,
    "int32": 14, "uint32": 15,
}  # fmt: skip
# The byte-sized MIL types by name, as numpy stores them (bf16 has no numpy type).
BYTE_DTYPES = {
    "fp16": np.float16, "fp32": np.float32, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32,
}  # fmt: skip

# Elements packed per step (a multiple of 8, so every step ends on a byte for any width).
_PACK_CHUNK = 1 << 22
# Bytes per copy_file_range call (the kernel may move fewer; the loop goes on).
_COPY_CHUNK = 1 << 30


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def read_blob(path: str, offset: int, dtype, shape) -> np.ndarray:
    """One tensor of a Core ML weight file, mapped read-only (no copy).

    The 64-byte record at `offset` gives the data's size and offset. The array is a read-only
    view of the file's pages: loading costs no memory copy, and the pages are shared with the
    page cache. The source file must not be modified in place while the program is alive
    (milsparse itself only ever writes new files).
    """
    try:
        file_size = os.path.getsize(path)
    except OSError as e:
        raise UnsupportedModelError(f"{path}: cannot read the weight file: {e.strerror}") from e
    if offset + 24 > file_size:
        raise UnsupportedModelError(
            f"{path}: weight file is truncated ({file_size} bytes; the model reads a record at "
            f"offset {offset})"
        )
    sentinel_and_type, size, data_offset = np.fromfile(path, np.uint64, 3, offset=offset)
    if int(sentinel_and_type) & 0xFFFFFFFF != SENTINEL:
        raise UnsupportedModelError(f"{path}: no weight record at offset {offset}")
    if int(data_offset) + int(size) > file_size:
        raise UnsupportedModelError(
            f"{path}: weight file is truncated ({file_size} bytes; a record needs "
            f"{int(data_offset) + int(size)})"
        )
    count = int(size) // np.dtype(dtype).itemsize
    expected = int(np.prod(shape, dtype=np.int64))
    if count != expected:
        raise UnsupportedModelError(
            f"{path}: weight record at offset {offset} holds {count} values, "
            f"the model says {expected}"
        )
    if count == 0:
        return np.zeros(shape, dtype)
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=int(data_offset), shape=(count,))
    return mapped.view(np.ndarray).reshape(shape)


def file_region(value: np.ndarray) -> tuple[str, int] | None:
    """(path, byte offset) of the file whose memory map `value` is a contiguous view of, or
    None when it lives in memory."""
    if not isinstance(value, np.ndarray) or not value.flags.c_contiguous:
        return None
    base = value
    while base is not None and not isinstance(base, np.memmap):
        base = base.base if isinstance(base, np.ndarray) else None
    if base is None or getattr(base, "filename", None) is None:
        return None
    start = value.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    return base.filename, int(base.offset) + start


def release_pages(value) -> None:
    """Let the pages of the file map under `value` (if it is a view of one) leave this
    process's resident memory: they stay in the page cache, and a later read faults them back
    in. Values in memory are left alone."""
    base = value
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    inner = getattr(base, "_mmap", None) if isinstance(base, np.memmap) else None
    if isinstance(inner, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        try:
            inner.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # closed, or a platform without it: nothing to do
            pass


def _write_all(fd: int, data: np.ndarray, offset: int) -> None:
    """pwrite all of the uint8 array `data` at `offset` (one call may write less)."""
    done = 0
    while done < data.size:
        done += os.pwrite(fd, data[done : done + _COPY_CHUNK].data, offset + done)


def _copy_region(src_path: str, src_offset: int, dst_fd: int, dst_offset: int, size: int):
    with open(src_path, "rb") as src:
        done = 0
        while done < size:
            count = min(size - done, _COPY_CHUNK)
            try:
                moved = os.copy_file_range(
                    src.fileno(), dst_fd, count, src_offset + done, dst_offset + done
                )
            except OSError:  # no copy_file_range between these files: read and write
                moved = 0
            if moved <= 0:
                chunk = os.pread(src.fileno(), min(count, 1 << 26), src_offset + done)
                if not chunk:
                    raise OSError(f"{src_path}: ends before offset {src_offset + size}")
                moved = os.pwrite(dst_fd, chunk, dst_offset + done)
            done += moved


class BlobWriter:
    """Appends tensors to a new weight file; `write` returns each record's offset.

    The header's count is rewritten with each record, so the file is complete after every
    write; `close` releases the descriptor (also done when the writer is collected)."""

    def __init__(self, path):
        self.path = str(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._close = weakref.finalize(self, os.close, self._fd)
        self.count = 0
        self._end = HEADER_BYTES
        self._write_header()

    def _write_header(self) -> None:
        header = np.zeros(HEADER_BYTES // 4, np.uint32)
        header[0], header[1] = self.count, VERSION
        os.pwrite(self._fd, header.tobytes(), 0)

    def close(self) -> None:
        self._close()

    def write(self, value: np.ndarray, type_name: str) -> int:
        """Append `value` (any shape; flattened row-major) as MIL type `type_name`."""
        code = TYPE_CODES[type_name]
        bits = SUB_BYTE_BITS.get(type_name)
        value = np.asarray(value) if not isinstance(value, np.ndarray) else value
        count = int(value.size)
        size = count * value.dtype.itemsize if bits is None else packed_bytes(count, bits)
        padding = 0 if bits is None else size * 8 - count * bits
        record = _align(self._end)
        data = record + RECORD_BYTES
        meta = np.zeros(RECORD_BYTES // 8, np.uint64)
        meta[0] = np.uint64(SENTINEL) | (np.uint64(code) << np.uint64(32))
        meta[1], meta[2], meta[3] = size, data, padding
        os.pwrite(self._fd, meta.tobytes(), record)
        region = file_region(value)
        if bits is None and region is not None:
            _copy_region(region[0], region[1], self._fd, data, size)
        elif bits is None:
            flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
            offset = 0
            while offset < flat.size:  # pwrite may write less than asked
                offset += os.pwrite(
                    self._fd, flat[offset : offset + _COPY_CHUNK].data, data + offset
                )
        else:
            self._write_packed(value, bits, data, region)
        self._end = data + size
        self.count += 1
        self._write_header()
        return record

    def _write_packed(self, value, bits, data, region) -> None:
        count, out = int(value.size), data
        source = open(region[0], "rb") if region is not None else None  # noqa: SIM115
        try:
            for start in range(0, count, _PACK_CHUNK):
                stop = min(start + _PACK_CHUNK, count)
                if source is not None:  # read the file, not the map: no pages stay resident
                    raw = os.pread(source.fileno(), stop - start, region[1] + start)
                    piece = np.frombuffer(raw, np.uint8)
                else:
                    piece = np.ascontiguousarray(value).reshape(-1)[start:stop]
                packed = pack_bits(piece, bits)
                os.pwrite(self._fd, packed.data, out)
                out += packed.size
        finally:
            if source is not None:
                source.close()


class Spill:
    """A scratch file for the values passes produce: `put(array)` appends the array's bytes
    (at a 64-byte boundary) and returns a read-only memory map of them with its dtype and shape.
    Reading the map faults pages in from the page cache; nobody writes to it.

    The same array put twice gives the same map (the functions of a multifunction package then
    still share one value). The file is removed by `close` (maps already made stay valid)."""

    def __init__(self, folder, min_bytes: int = 1 << 16):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._fd, self.path = tempfile.mkstemp(dir=folder, suffix=".spill")
        self._close = weakref.finalize(self, os.close, self._fd)
        self.min_bytes = min_bytes
        self._end = 0
        self._made: dict[int, tuple[weakref.ref, np.ndarray]] = {}
        self.bytes = 0

    def put(self, value: np.ndarray) -> np.ndarray:
        if not isinstance(value, np.ndarray) or value.nbytes < self.min_bytes:
            return value
        if value.dtype.hasobject or file_region(value) is not None:
            return value  # objects cannot be mapped; a mapped value is on disk already
        key = id(value)
        made = self._made.get(key)
        if made is not None and made[0]() is value:
            return made[1]
        offset = _align(self._end)
        flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        _write_all(self._fd, flat, offset)
        self._end = offset + flat.size
        self.bytes += flat.size
        mapped = np.memmap(self.path, dtype=value.dtype, mode="r", offset=offset, shape=value.shape)
        try:
            ref = weakref.ref(value, lambda _, key=key: self._made.pop(key, None))
        except TypeError:  # arrays that take no weak references are not deduplicated
            return mapped
        self._made[key] = (ref, mapped)
        return mapped

    def close(self) -> None:
        if self._close.alive:
            self._close()
            self._made.clear()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
