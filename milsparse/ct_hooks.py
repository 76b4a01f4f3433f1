"""Scoped swaps of coremltools' module globals: its weight loader, its weight-file writer and
its pass-pipeline progress bar.

coremltools' milproto loader and MIL exporter look their per-value functions and writer class
up as module globals at each call, so milsparse swaps them for the length of one load or one
export. Each swap holds one process-wide lock (two threads never see each other's swap, and a
swap never outlives its block) and restores the originals on exit, exception or not: after any
milsparse call every coremltools global is what it was.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import numpy as np
from coremltools.converters.mil.frontend.milproto import load as milproto

from milsparse.ir import blobs
from milsparse.ir.errors import UnsupportedModelError

__all__ = ["mapped_weight_reads", "milsparse_blob_writer", "coremltools_progress"]

# Re-entrant: an export may load (it does not today), and a load inside a load is harmless.
_LOCK = threading.RLock()


def _byte_dtype(valuetype):
    """The numpy dtype of a byte-sized MIL tensor type, or None (sub-byte, bf16, immediates)."""
    from coremltools.converters.mil.mil import types

    primitive = getattr(valuetype, "get_primitive", lambda: None)()
    if primitive is None:
        return None
    return blobs.BYTE_DTYPES.get(types.builtin_to_string(primitive))


def _inside(path: str, top: str | None) -> bool:
    """Whether `path` resolves inside the folder `top` (already resolved; None: anywhere)."""
    if top is None:
        return True
    real = os.path.realpath(path)
    return real == top or real.startswith(top + os.sep)


@contextlib.contextmanager
def mapped_weight_reads(package_root: str | None = None, on_op=None):
    """Map byte-aligned weight-file tensors instead of copying them, during one milproto load
    (and call `on_op()` after each op is loaded, for a progress bar).

    coremltools' loader maps the whole weight file and then copies each tensor two or three
    times (`tobytes`, `np.array`, `astype`): loading a model peaked at over twice its size.
    Values the hook does not handle (immediates, sub-byte blobs) go to the original.

    A weight file is read only from the package's own weights folder: a model without a weights
    item (coremltools would read `weight.bin` of the current directory) or one whose weights
    resolve outside `package_root` (a manifest path or a symbolic link leading elsewhere) is an
    UnsupportedModelError.
    """
    with _LOCK:
        original = milproto._load_value
        # One array per weight-file record: the functions of a multifunction package that
        # share a weight then hold the very same array, which is how passes and reports
        # recognise sharing.
        loaded: dict[tuple[str, int, bytes], np.ndarray] = {}
        # Every weight of a package reads the same file or two: each path is resolved once.
        top = None if package_root is None else os.path.realpath(package_root)
        inside: set[str] = set()

        def load_value(context, value_spec):
            if value_spec.WhichOneof("value") != "blobFileValue" or value_spec.docString:
                return original(context, value_spec)
            if not context.weights_dir:
                raise UnsupportedModelError(
                    f"{package_root or 'the model'}: the package has no weights item, but its "
                    "program reads a weight file; is the package complete?"
                )
            blob = value_spec.blobFileValue
            path = os.path.join(context.weights_dir, blob.fileName.split("/")[-1])
            if path not in inside and not _inside(path, top):
                raise UnsupportedModelError(
                    f"{package_root}: its weight file {path} lies outside the package; milsparse "
                    "reads weights only from inside the package"
                )
            inside.add(path)
            key = (path, int(blob.offset), value_spec.type.SerializeToString(deterministic=True))
            if key not in loaded:
                valuetype = milproto.proto_to_types(value_spec.type)
                dtype = _byte_dtype(valuetype)
                if dtype is not None:
                    loaded[key] = blobs.read_blob(path, blob.offset, dtype, valuetype.get_shape())
                else:  # sub-byte values (uint1 masks, uint4 indices): coremltools unpacks them
                    loaded[key] = original(context, value_spec)
            return loaded[key]

        original_op = milproto._load_operation

        def load_operation(context, op_spec):
            result = original_op(context, op_spec)
            on_op()
            return result

        milproto._load_value = load_value
        if on_op is not None:
            milproto._load_operation = load_operation
        try:
            yield
        finally:
            milproto._load_value, milproto._load_operation = original, original_op


@contextlib.contextmanager
def milsparse_blob_writer(on_bytes=None):
    """Serialise weights with `milsparse.ir.blobs.BlobWriter` during one export (calling
    `on_bytes(n)` with each value's size in bytes as it is written, for a progress bar).

    The bytes are coremltools' (tested), but a weight that is a view of a memory-mapped file
    (an input weight left as it was, a value a pass spilled to disk) moves file to file
    without entering memory, and sub-byte values are packed a chunk at a time.
    """
    from coremltools.converters.mil.backend.mil import helper
    from coremltools.converters.mil.backend.mil import load as backend
    from coremltools.converters.mil.mil import types

    with _LOCK:
        writers: list = []

        def make_writer(path):
            writer = blobs.BlobWriter(path)
            writers.append(writer)
            return writer

        def write_value(var, writer):
            value = var.val
            expected = blobs.BYTE_DTYPES.get(types.builtin_to_string(var.dtype))
            if expected is not None and value.dtype != expected:
                value = value.astype(expected)
            offset = writer.write(value, types.builtin_to_string(var.dtype))
            if on_bytes is not None:
                on_bytes(value.nbytes)
            return offset

        original_writer, original_write = backend.BlobWriter, helper._get_offset_by_writing_data
        backend.BlobWriter, helper._get_offset_by_writing_data = make_writer, write_value
        try:
            yield
        finally:
            backend.BlobWriter, helper._get_offset_by_writing_data = (
                original_writer,
                original_write,
            )
            for writer in writers:
                writer.close()


@contextlib.contextmanager
def coremltools_progress(show: bool | None = None):
    """coremltools' "Running MIL ... pipeline" bars (printed for every export, none of them
    about milsparse's work): shown with `show=True`, never with False, and with None only on a
    terminal (tqdm's own rule), so a library call off a terminal prints nothing."""
    from coremltools.converters.mil.mil.passes import pass_pipeline

    with _LOCK:
        original = pass_pipeline.tqdm
        disable = None if show is None else not show
        pass_pipeline.tqdm = functools.partial(original, disable=disable)
        try:
            yield
        finally:
            pass_pipeline.tqdm = original
