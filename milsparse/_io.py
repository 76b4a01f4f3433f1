"""Reading models into pymil Programs and writing Programs back, without side effects.

- A saved `.mlpackage` (or an MLModel, which may lack `_mil_program` once loaded from disk) is
  read into a fresh pymil Program through coremltools' milproto loader; the caller's model is
  never touched.
- A Program becomes an MLModel through coremltools' MIL backend with an EMPTY main pipeline (the
  default pipeline is not re-run), in a temporary folder that is deleted when the returned model
  is garbage-collected (or at exit), not left behind.
- `save_package` writes atomically: into a sibling temporary folder, then renamed into place,
  with the package manifest's random item identifiers replaced by ones derived from the content
  paths, so the same input and recipe give a byte-identical package.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path

import coremltools as ct
import numpy as np
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from coremltools.converters.mil.frontend.milproto import load as milproto

from milsparse.errors import ConfigError, UnsupportedModelError
from milsparse.ir.blobs import release_pages

__all__ = [
    "TARGETS",
    "parse_target",
    "open_model",
    "load_program",
    "retarget",
    "program_to_model",
    "save_package",
    "write_program",
    "check_output_path",
    "source_path",
    "package_bytes",
    "remove_stale_temporaries",
]

# The deployment targets milsparse writes: constexpr_sparse_to_dense needs iOS16; the iOS18
# opset adds the uint1 mask and the joint forms. The same opsets under their other platforms'
# names (macOS13-15, tvOS16-18, watchOS9-11) are accepted too.
TARGETS = {
    "ios16": AvailableTarget.iOS16,
    "ios17": AvailableTarget.iOS17,
    "ios18": AvailableTarget.iOS18,
}
_TARGET_ALIASES = {
    name.lower(): member
    for name, member in AvailableTarget.__members__.items()
    if member in TARGETS.values()
}


def parse_target(target) -> AvailableTarget | None:
    """None, a ct.target from iOS16 to iOS18, or a name: 'ios16' | 'ios17' | 'ios18', or the
    same opsets as 'macOS13'-'macOS15', 'tvOS16'-'tvOS18', 'watchOS9'-'watchOS11' (any case)."""
    if target is None:
        return None
    if isinstance(target, AvailableTarget) and target in TARGETS.values():
        return target
    if isinstance(target, str) and target.strip().lower() in _TARGET_ALIASES:
        return _TARGET_ALIASES[target.strip().lower()]
    shown = target.name if isinstance(target, AvailableTarget) else repr(target)
    raise ConfigError(
        f"unsupported target {shown}; use one of {', '.join(TARGETS)} "
        "(or macOS13-15, tvOS16-18, watchOS9-11)"
    )


def open_model(model) -> ct.models.MLModel:
    """An MLModel from an MLModel or a path; raises UnsupportedModelError for anything else."""
    if isinstance(model, ct.models.MLModel):
        mlmodel = model
        where = "the model"
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        where = str(path)
        if not path.exists():
            raise UnsupportedModelError(f"{path}: no such file or directory")
        if path.is_dir() and not (path / "Manifest.json").exists():
            raise UnsupportedModelError(f"{path}: not an .mlpackage (no Manifest.json inside)")
        if not path.is_dir():
            _refuse_bare_spec(path)
        try:
            mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
        except Exception as e:  # coremltools raises bare Exceptions for unreadable packages
            raise UnsupportedModelError(f"{path}: cannot read Core ML model: {e}") from e
    else:
        raise UnsupportedModelError(
            f"expected an MLModel or a path to a .mlpackage, got {type(model).__name__}"
        )
    kind = mlmodel.get_spec().WhichOneof("Type")
    if kind != "mlProgram":
        raise UnsupportedModelError(
            f"{where} is a {kind} model; milsparse works on ML programs. Re-convert with "
            "ct.convert(..., convert_to='mlprogram', minimum_deployment_target=ct.target.iOS16)."
        )
    return mlmodel


def _refuse_bare_spec(path: Path) -> None:
    """A bare model file: an ML program's weights live beside its spec inside the package, and
    coremltools would read `weights/weight.bin` relative to the current directory."""
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(path.read_bytes())
        kind = spec.WhichOneof("Type")
    except Exception:
        kind = None
    if kind == "mlProgram" or kind is None:
        raise UnsupportedModelError(
            f"{path}: give the .mlpackage folder; an ML program's weights live inside its "
            "package, not beside a bare model file"
        )


_BLOB_SENTINEL = 0xDEADBEEF


def _direct_blob_dtypes() -> dict:
    from coremltools.converters.mil.mil import types

    return {
        types.fp16: np.float16,
        types.fp32: np.float32,
        types.int8: np.int8,
        types.uint8: np.uint8,
        types.int16: np.int16,
        types.uint16: np.uint16,
        types.int32: np.int32,
        types.uint32: np.uint32,
    }


def read_blob(path: str, offset: int, dtype, shape) -> np.ndarray:
    """One tensor of a Core ML weight file, mapped read-only (no copy).

    The 64-byte record at `offset` gives the data's size and offset. The array is a read-only
    view of the file's pages: loading costs no memory copy, and the pages are shared with the
    page cache. The source file must not be modified in place while the program is alive
    (milsparse itself only ever writes new packages).
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
    if int(sentinel_and_type) & 0xFFFFFFFF != _BLOB_SENTINEL:
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


@contextlib.contextmanager
def _mapped_weight_reads():
    """Map byte-aligned weight-file tensors instead of copying them, during one milproto load.

    coremltools' loader maps the whole weight file and then copies each tensor two or three
    times (`tobytes`, `np.array`, `astype`): loading a model peaked at over twice its size and
    took most of compress's time.
    This wraps the loader's per-value function, which it looks up as a module global at each
    call; values it does not handle (immediates, sub-byte blobs) go to the original. Restored on
    exit.
    """
    original = milproto._load_value
    direct = _direct_blob_dtypes()
    # One array per weight-file record: the functions of a multifunction package that share a
    # weight then hold the very same array, which is how passes and reports recognise sharing.
    loaded: dict[tuple[str, int, bytes], np.ndarray] = {}

    def load_value(context, value_spec):
        if value_spec.WhichOneof("value") != "blobFileValue" or value_spec.docString:
            return original(context, value_spec)
        blob = value_spec.blobFileValue
        path = os.path.join(context.weights_dir, blob.fileName.split("/")[-1])
        key = (path, int(blob.offset), value_spec.type.SerializeToString(deterministic=True))
        if key not in loaded:
            valuetype = milproto.proto_to_types(value_spec.type)
            primitive = getattr(valuetype, "get_primitive", lambda: None)()
            if primitive in direct:
                loaded[key] = read_blob(path, blob.offset, direct[primitive], valuetype.get_shape())
            else:  # sub-byte values (uint1 masks, uint4 indices): coremltools unpacks them
                loaded[key] = original(context, value_spec)
        return loaded[key]

    milproto._load_value = load_value
    try:
        yield
    finally:
        milproto._load_value = original


@contextlib.contextmanager
def _milsparse_blob_writer():
    """Serialise weights with `milsparse.ir.blobs.BlobWriter` during one export.

    The bytes are coremltools' (tested), but a weight that is a view of a memory-mapped file
    (an input weight left as it was, a value a pass spilled to disk) moves file to file
    without entering memory, and sub-byte values are packed a chunk at a time. coremltools'
    exporter looks up its writer class and its per-value function as module globals at each
    call; both are restored on exit.
    """
    from coremltools.converters.mil.backend.mil import helper
    from coremltools.converters.mil.backend.mil import load as backend
    from coremltools.converters.mil.mil import types

    from milsparse.ir import blobs

    writers: list = []
    byte_types = _direct_blob_dtypes()  # MIL type -> numpy dtype of the byte-sized types

    def make_writer(path):
        writer = blobs.BlobWriter(path)
        writers.append(writer)
        return writer

    def write_value(var, writer):
        value = var.val
        expected = byte_types.get(var.dtype)
        if expected is not None and value.dtype != expected:
            value = value.astype(expected)
        return writer.write(value, types.builtin_to_string(var.dtype))

    original_writer, original_write = backend.BlobWriter, helper._get_offset_by_writing_data
    backend.BlobWriter, helper._get_offset_by_writing_data = make_writer, write_value
    try:
        yield
    finally:
        backend.BlobWriter, helper._get_offset_by_writing_data = original_writer, original_write
        for writer in writers:
            writer.close()


def load_program(mlmodel: ct.models.MLModel):
    """A fresh pymil Program read from the model's spec and weight file."""
    spec = mlmodel.get_spec()
    weights_dir = mlmodel.weights_dir or ""
    try:
        with _mapped_weight_reads():
            prog = milproto.load(
                spec,
                specification_version=spec.specificationVersion,
                file_weights_dir=weights_dir,
            )
        _keep_functions(prog, spec.description)
        return prog
    except UnsupportedModelError:
        raise
    except Exception as e:
        # coremltools' loader raises bare errors for a damaged package (sub-byte weights of a
        # truncated file, a missing blob); they are the package's fault, not milsparse's.
        where = os.path.dirname(weights_dir) if weights_dir else "the model"
        raise UnsupportedModelError(
            f"{where}: cannot read the ML program ({type(e).__name__}: {e}); is the package "
            "complete?"
        ) from e


def _keep_functions(prog, description) -> None:
    """Carry a multifunction package's default function over, and fix the function order.

    The loader names no default function (coremltools then looks for `main`) and lists the
    functions in the order of a protobuf map, which may change with PYTHONHASHSEED and would
    reorder the output's weight file. The default comes first, the rest by name.
    """
    if description.functions:
        prog.default_function_name = description.defaultFunctionName or "main"
        prog.export_as_multifunction = True
    default = prog.default_function_name
    order = sorted(prog.functions, key=lambda name: (name != default, name))
    functions = {name: prog.functions[name] for name in order}
    prog.functions.clear()
    prog.functions.update(functions)


def share_identical_consts(prog) -> int:
    """Mark equal weight consts of different functions to be stored once; return how many
    consts share a record with another.

    coremltools' serialiser writes each function's consts on their own unless they carry the
    same `weight_id` (as `save_multifunction` sets them). Equal means same dtype, shape and
    bytes: the same array (shared on load), or equal content (a weight pruned the same way in
    every function). Ids are given in program order, so the output is deterministic.
    """
    if len(prog.functions) < 2:
        return 0
    groups: dict[tuple, list] = {}
    by_identity: dict[int, tuple] = {}
    for func in prog.functions.values():
        for op in _walk(func):
            val = op.outputs[0].val if op.op_type == "const" else None
            if not isinstance(val, np.ndarray) or val.size <= 9:
                continue
            key = by_identity.get(id(val))
            if key is None:
                digest = hashlib.blake2b(np.ascontiguousarray(val).view(np.uint8).data)
                key = (str(val.dtype), val.shape, digest.hexdigest())
                by_identity[id(val)] = key
                release_pages(val)  # a mapped weight's pages, read to hash it, leave memory
            groups.setdefault(key, []).append(op)
    shared = 0
    for index, ops in enumerate(g for g in groups.values() if len(g) > 1):
        for op in ops:
            op.weight_id = f"milsparse_shared_{index}"
        shared += len(ops)
    return shared


def _walk(block):
    for op in list(block.operations):
        yield op
        for inner in op.blocks:
            yield from _walk(inner)


def retarget(prog, spec_version: int, target: AvailableTarget | None) -> int:
    """Raise every function's opset to `target`; return the specification version to write.

    Raising is sound: a newer opset keeps every older op. Lowering is refused.
    """
    if target is None:
        return spec_version
    for name, func in prog.functions.items():
        current = func.opset_version
        if current is not None and current > target:
            raise ConfigError(
                f"function {name!r} already targets {current.name}; cannot lower it to "
                f"{target.name}. Drop --target or choose {current.name} or later."
            )
        func.opset_version = target
    return max(spec_version, target.value)


def _can_predict() -> bool:
    """True where coremltools can load models for prediction (macOS)."""
    return getattr(ct.models.model, "_MLModelProxy", None) is not None


_MANIFEST_ITEMS = (
    ("com.apple.CoreML/model.mlmodel", "model.mlmodel", "CoreML Model Specification"),
    ("com.apple.CoreML/weights", "weights", "CoreML Model Weights"),
)


def _item_id(path: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "milsparse:com.apple.CoreML/" + path))


def _write_manifest(package: Path) -> None:
    entries = {
        _item_id(path): {
            "author": "com.apple.CoreML",
            "description": desc,
            "name": name,
            "path": path,
        }
        for path, name, desc in _MANIFEST_ITEMS
    }
    manifest = {
        "fileFormatVersion": "1.0.0",
        "itemInfoEntries": dict(sorted(entries.items())),
        "rootModelIdentifier": _item_id(_MANIFEST_ITEMS[0][0]),
    }
    (package / "Manifest.json").write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def _description(source: ct.models.MLModel, metadata: dict[str, str] | None):
    description = type(source.get_spec().description)()
    description.CopyFrom(source.get_spec().description)
    for key, value in (metadata or {}).items():
        description.metadata.userDefined[key] = value
    return description


def _write_package(
    prog, spec_version: int, source: ct.models.MLModel, package: Path, metadata=None
) -> None:
    """Serialise `prog` as an .mlpackage at `package` (which must not exist).

    coremltools' MIL backend writes the weight file straight into the package's weights folder
    and returns the spec; the package around them is assembled here rather than by ModelPackage,
    which would copy the whole weight file once more. Same layout, deterministic bytes.
    """
    from coremltools.converters.mil.converter import (
        ConverterRegistry,
        _reset_conversion_state,
        mil_convert_to_proto,
    )

    data = package / "Data" / "com.apple.CoreML"
    weights = data / "weights"
    weights.mkdir(parents=True)
    share_identical_consts(prog)
    try:
        with _milsparse_blob_writer():
            spec, _ = mil_convert_to_proto(
                prog,
                "milinternal",
                "mlprogram",
                ConverterRegistry,
                main_pipeline=ct.PassPipeline.EMPTY,
                weights_dir=str(weights),
                specification_version=spec_version,
                model_description=_description(source, metadata),
            )
    finally:
        _reset_conversion_state()
    (data / "model.mlmodel").write_bytes(spec.SerializeToString(deterministic=True))
    _write_manifest(package)


def _open_written(path: Path, source: ct.models.MLModel) -> ct.models.MLModel:
    return ct.models.MLModel(
        str(path), skip_model_load=not _can_predict(), compute_units=source.compute_unit
    )


def program_to_model(
    prog, spec_version: int, source: ct.models.MLModel, metadata: dict[str, str] | None = None
) -> ct.models.MLModel:
    """Serialise `prog` to an MLModel with `source`'s description (plus `metadata` entries) and
    compute units.

    The package lives in a temporary folder removed when the model is garbage-collected.
    """
    remove_stale_temporaries(tempfile.gettempdir())
    folder = tempfile.mkdtemp(prefix=_temp_prefix(""))
    try:
        package = Path(folder) / "model.mlpackage"
        _write_package(prog, spec_version, source, package, metadata)
        model = _open_written(package, source)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, folder, True)
    return model


def _make_deterministic(package: Path) -> None:
    """Make a package's bytes a function of its content.

    coremltools names manifest items with random UUIDs and serialises the spec's protobuf maps
    in no fixed order; here the ids are derived from each item's path and the spec is rewritten
    with deterministic serialisation. The manifest keeps ModelPackage's own layout, so opening
    the package later does not rewrite it.
    """
    from coremltools.proto import Model_pb2

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries = manifest.get("itemInfoEntries", {})
    renamed = {}
    for old_id, info in entries.items():
        key = f"{info.get('author', '')}/{info.get('path', '')}"
        renamed[old_id] = str(uuid.uuid5(uuid.NAMESPACE_URL, "milsparse:" + key))
    manifest["itemInfoEntries"] = {renamed[k]: entries[k] for k in sorted(entries, key=renamed.get)}
    root = entries.get(manifest.get("rootModelIdentifier"), {})
    if manifest.get("rootModelIdentifier") in renamed:
        manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
    spec_path = package / "Data" / root.get("path", "com.apple.CoreML/model.mlmodel")
    if spec_path.is_file():
        spec = Model_pb2.Model()
        spec.ParseFromString(spec_path.read_bytes())
        spec_path.write_bytes(spec.SerializeToString(deterministic=True))


def source_path(model) -> Path | None:
    """The package a model was read from (a path, or an MLModel's package), or None."""
    if isinstance(model, (str, os.PathLike)):
        return Path(model)
    package = getattr(model, "package_path", None)
    return Path(package) if package else None


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def compress_needs(model) -> int:
    """Free disk a compression of `model` may need beside its output: the output (at most the
    model's size) and the scratch file of spilled values (at most as much again: fp16 values
    and masks held one byte per weight)."""
    return 2 * package_bytes(model)


def check_output_path(path, *, overwrite: bool, inputs=(), needed_bytes: int = 0) -> Path:
    """Refuse, before any work, an output that cannot be written or would touch an input.

    The output must end in .mlpackage, lie in an existing, writable folder with room for
    `needed_bytes`, not be a symbolic link, and be neither an input, inside one, nor a folder
    holding one. An existing output is replaced only with `overwrite`, and only if it is an
    .mlpackage itself.
    """
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ConfigError(f"{path}: output must end in .mlpackage")
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link; give the real output path")
    resolved = path.resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if resolved == src:
            raise ConfigError("output is the input; milsparse never modifies its input")
        if _is_within(resolved, src):
            raise ConfigError(f"{path} is inside the input {source}; write the output elsewhere")
        if _is_within(src, resolved):
            raise ConfigError(f"{path} holds the input {source}; write the output elsewhere")
    if path.exists():
        if not overwrite:
            raise ConfigError(f"{path} exists; choose another path or allow overwriting (--force)")
        if not (path.is_dir() and (path / "Manifest.json").is_file()):
            raise ConfigError(f"{path} exists and is not an .mlpackage; it is not overwritten")
    parent = resolved.parent
    if not parent.exists():
        raise ConfigError(f"{path.parent}: output folder does not exist")
    if not parent.is_dir():
        raise ConfigError(f"{path.parent} is not a folder")
    _check_writable(parent)
    if needed_bytes:
        free = shutil.disk_usage(parent).free
        if free < needed_bytes:
            raise ConfigError(
                f"{path.parent}: {free / 2**20:.1f} MiB free, the output (and the scratch "
                f"values beside it) needs up to "
                f"{needed_bytes / 2**20:.1f} MiB"
            )
    return path


def _check_writable(folder: Path) -> None:
    """Create and remove a folder there: the only test that holds for root and read-only
    mounts alike (os.access says yes to root)."""
    try:
        probe = tempfile.mkdtemp(prefix=_temp_prefix(".probe"), dir=folder)
        os.rmdir(probe)
    except OSError as e:
        raise ConfigError(f"{folder}: cannot write there: {e.strerror}") from e


def package_bytes(model) -> int:
    """Bytes of the files in a model's package (0 when it has none on disk)."""
    root = source_path(model)
    if root is None or not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


# -- temporary folders ------------------------------------------------------------------------
# Every temporary folder milsparse makes is named `<prefix>milsparse-tmp-<pid>-<random>`, so a
# later run can recognise those left by a process that is gone (SIGKILL, power loss) and remove
# them; SIGINT, SIGTERM and SIGHUP unwind normally and clean up on the way out.
_TEMP_TAG = "milsparse-tmp-"


def _temp_prefix(prefix: str) -> str:
    return f"{prefix}{_TEMP_TAG}{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove temporary folders of milsparse processes that no longer run; return them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        tag = entry.name.find(_TEMP_TAG)
        if tag < 0 or not entry.is_dir() or entry.is_symlink():
            continue
        pid_text = entry.name[tag + len(_TEMP_TAG) :].split("-", 1)[0]
        if not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def spill_folder(output=None):
    """A temporary folder for the values passes spill (`milsparse.ir.blobs.Spill`): beside
    `output` (same file system: its bytes then move into the output file by reference or a
    kernel copy), or in the temporary folder. Removed on exit; a full disk is a ConfigError."""
    parent = Path(output).parent if output is not None else Path(tempfile.gettempdir())
    remove_stale_temporaries(parent)
    folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(".spill."), dir=parent))
    try:
        yield folder
    except OSError as e:
        if e.errno in _DISK_ERRORS:
            raise ConfigError(f"{parent}: cannot write compressed values: {e.strerror}") from e
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _staged(path: Path):
    """Yield a path in a sibling temporary folder; on success it atomically becomes `path`.

    An existing package at `path` is moved aside and only dropped once the new one is in place;
    on any failure the old package stays and nothing is left behind. A full disk or a folder
    that refuses writes is a ConfigError.
    """
    remove_stale_temporaries(path.parent)
    staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(f".{path.name}."), dir=path.parent))
    try:
        staged = staging / path.name
        try:
            yield staged
            _make_deterministic(staged)
        except OSError as e:
            if e.errno in _DISK_ERRORS:
                raise ConfigError(f"{path}: cannot write the output: {e.strerror}") from e
            raise
        if path.exists():
            backup = staging / "previous"
            os.replace(path, backup)
            try:
                os.replace(staged, path)
            except BaseException:
                os.replace(backup, path)
                raise
        else:
            os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_package(model: ct.models.MLModel, path, *, overwrite: bool = False) -> Path:
    """Write `model` to `path` (.mlpackage) atomically; never leaves a half-written package."""
    path = check_output_path(
        path, overwrite=overwrite, inputs=[source_path(model)], needed_bytes=package_bytes(model)
    )
    with _staged(path) as staged:
        model.save(str(staged))
    return path


def write_program(
    prog,
    spec_version: int,
    source: ct.models.MLModel,
    path,
    *,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
) -> ct.models.MLModel:
    """Serialise `prog` straight to `path` (atomically) and return the model read from there.

    Saves the copy that `program_to_model` + `save_package` make of the temporary package.
    """
    path = check_output_path(path, overwrite=overwrite)
    with _staged(path) as staged:
        _write_package(prog, spec_version, source, staged, metadata)
    return _open_written(path, source)
