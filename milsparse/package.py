"""Core ML packages in and out: opening and loading one into a pymil Program, and writing a
Program back as a package, without side effects.

- A saved `.mlpackage` (or an MLModel, which may lack `_mil_program` once loaded from disk) is
  read into a fresh pymil Program through coremltools' milproto loader, its weights mapped from
  the package's own weight file (never from outside the package); the caller's model is never
  touched.
- A Program becomes an MLModel through coremltools' MIL backend with an EMPTY main pipeline (the
  default pipeline is not re-run), in a temporary folder that is deleted when the returned model
  is garbage-collected (or at exit), not left behind.
- `save_package` and `write_program` write through `milsparse.staging.staged` (atomic, never over
  another writer's output), with the manifest's random item identifiers replaced by ones derived
  from the content paths, so the same input and recipe give a byte-identical package.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path

import coremltools as ct
from coremltools.converters.mil.frontend.milproto import load as milproto

from milsparse import ct_hooks, staging
from milsparse.errors import UnsupportedModelError
from milsparse.ir import progress
from milsparse.passes.program_edits import order_functions, share_identical_consts

__all__ = [
    "open_model",
    "load_program",
    "program_to_model",
    "save_package",
    "write_program",
    "source_path",
    "package_bytes",
    "compress_needs",
    "is_program",
    "program_spec_version",
]


def is_program(model) -> bool:
    """Whether `model` is a pymil Program (rather than an MLModel or a path)."""
    from coremltools.converters.mil.mil import Program

    return isinstance(model, Program)


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
        if path.is_dir():
            _check_manifest(path)
        else:
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


def _check_manifest(package: Path) -> None:
    """Every item the manifest names lies inside the package (symbolic links followed)."""
    try:
        manifest = json.loads((package / "Manifest.json").read_text(encoding="utf-8"))
        items = manifest["itemInfoEntries"].values()
        paths = [str(item["path"]) for item in items]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UnsupportedModelError(f"{package}: unreadable Manifest.json ({e})") from e
    root = package.resolve()
    for item in paths:
        resolved = (package / "Data" / item).resolve()
        if root not in resolved.parents:
            raise UnsupportedModelError(
                f"{package}: its manifest names {item!r}, which lies outside the package; "
                "milsparse reads only what is inside the package"
            )


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


def _count_ops(spec) -> int:
    """The ops of an ML program's spec, nested blocks included (what the loader will build)."""

    def in_block(block) -> int:
        return sum(1 + sum(in_block(b) for b in op.blocks) for op in block.operations)

    return sum(
        in_block(block)
        for function in spec.mlProgram.functions.values()
        for block in function.block_specializations.values()
    )


def _display_name(mlmodel, package) -> str:
    return Path(package).name if package else "model"


def load_program(mlmodel: ct.models.MLModel, show_progress: bool | None = None):
    """A fresh pymil Program read from the model's spec and the package's weight file; a bar
    counts the ops built (`show_progress`: see `milsparse.ir.progress`)."""
    spec = mlmodel.get_spec()
    weights_dir = mlmodel.weights_dir or ""
    package = getattr(mlmodel, "package_path", None)
    try:
        with progress.bar(
            f"loading {_display_name(mlmodel, package)}", total=_count_ops(spec), unit="op",
            show=show_progress,
        ) as bar, ct_hooks.mapped_weight_reads(package_root=package, on_op=bar.update):  # fmt: skip
            prog = milproto.load(
                spec,
                specification_version=spec.specificationVersion,
                file_weights_dir=weights_dir,
            )
        order_functions(prog, spec.description)
        return prog
    except UnsupportedModelError:
        raise
    except Exception as e:
        # coremltools' loader raises bare errors for a damaged package (sub-byte weights of a
        # truncated file, a missing blob); they are the package's fault, not milsparse's.
        where = package or (os.path.dirname(weights_dir) if weights_dir else "the model")
        raise UnsupportedModelError(
            f"{where}: cannot read the ML program ({type(e).__name__}: {e}); is the package "
            "complete?"
        ) from e


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


def _description(source: ct.models.MLModel | None, metadata: dict[str, str] | None):
    """`source`'s model description plus `metadata` entries; None without a source (the
    exporter then describes the program's inputs and outputs itself)."""
    if source is None:
        return None
    description = type(source.get_spec().description)()
    description.CopyFrom(source.get_spec().description)
    for key, value in (metadata or {}).items():
        description.metadata.userDefined[key] = value
    return description


def _weight_bytes(prog) -> int:
    """Bytes of the program's constant tensors as the weight file will hold them (about)."""
    from milsparse.ir.graph import walk_ops

    total = 0
    for func in prog.functions.values():
        for op in walk_ops(func):
            if op.op_type == "const":
                val = op.outputs[0].val
                total += getattr(val, "nbytes", 0) if getattr(val, "size", 0) > 9 else 0
    return total


def write_package(
    prog,
    spec_version: int,
    source: ct.models.MLModel | None,
    package: Path,
    metadata=None,
    show_progress: bool | None = None,
) -> None:
    """Serialise `prog` as an .mlpackage at `package` (which must not exist), described as
    `source` is (None: as the program's own inputs and outputs say); a bar counts the weight
    bytes written (`show_progress`: see `milsparse.ir.progress`).

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
        with progress.bar(
            f"writing {package.name}", total=_weight_bytes(prog), in_bytes=True,
            show=show_progress,
        ) as bar, ct_hooks.milsparse_blob_writer(on_bytes=bar.update), \
                ct_hooks.coremltools_progress(False):  # fmt: skip
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


def _open_written(path: Path, source: ct.models.MLModel | None) -> ct.models.MLModel:
    units = ct.ComputeUnit.ALL if source is None else source.compute_unit
    return ct.models.MLModel(str(path), skip_model_load=not _can_predict(), compute_units=units)


def program_spec_version(prog) -> int:
    """The Core ML specification version a Program's opsets need (its newest function's)."""
    return max(int(func.opset_version.value) for func in prog.functions.values())


def program_to_model(
    prog,
    spec_version: int,
    source: ct.models.MLModel,
    metadata: dict[str, str] | None = None,
    show_progress: bool | None = None,
) -> ct.models.MLModel:
    """Serialise `prog` to an MLModel with `source`'s description (plus `metadata` entries) and
    compute units.

    The package lives in a temporary folder removed when the model is garbage-collected.
    """
    staging.remove_stale_temporaries(tempfile.gettempdir())
    folder = tempfile.mkdtemp(prefix=staging.temp_prefix(""))
    try:
        package = Path(folder) / "model.mlpackage"
        write_package(prog, spec_version, source, package, metadata, show_progress)
        model = _open_written(package, source)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, folder, True)
    return model


def make_deterministic(package: Path) -> None:
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


def package_bytes(model) -> int:
    """Bytes of the files in a model's package (0 when it has none on disk)."""
    root = source_path(model)
    if root is None or not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def compress_needs(model) -> int:
    """Free disk a compression of `model` may need beside its output: the output (at most the
    model's size) and the scratch file of spilled values (at most as much again: fp16 values
    and masks held one byte per weight)."""
    return 2 * package_bytes(model)


def save_package(model: ct.models.MLModel, path, *, overwrite: bool = False) -> Path:
    """Write `model` to `path` (.mlpackage) atomically; never leaves a half-written package."""
    path = staging.check_output_path(
        path, overwrite=overwrite, inputs=[source_path(model)], needed_bytes=package_bytes(model)
    )
    with staging.staged(path, overwrite=overwrite, finish=make_deterministic) as staged:
        model.save(str(staged))
    return path


def write_program(
    prog,
    spec_version: int,
    source: ct.models.MLModel | None,
    path,
    *,
    overwrite: bool = False,
    metadata: dict[str, str] | None = None,
    show_progress: bool | None = None,
) -> ct.models.MLModel:
    """Serialise `prog` straight to `path` (atomically) and return the model read from there.

    Saves the copy that `program_to_model` + `save_package` make of the temporary package.
    """
    path = staging.check_output_path(path, overwrite=overwrite)
    with staging.staged(path, overwrite=overwrite, finish=make_deterministic) as staged:
        write_package(prog, spec_version, source, staged, metadata, show_progress)
    return _open_written(path, source)
