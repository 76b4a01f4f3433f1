"""The public functions: compress a model, build a ct.convert pipeline, inspect a model."""

from __future__ import annotations

import json
from pathlib import Path

import coremltools as ct

from milsparse import _io
from milsparse.errors import MilsparseError, PassError
from milsparse.ir.weights import weight_table
from milsparse.passes.prune import PruneWeights
from milsparse.passes.registry import place_in_pipeline
from milsparse.passes.upgrade import upgrade_constexpr_ops
from milsparse.recipe import Recipe
from milsparse.report import CompressReport, InspectReport
from milsparse.verify import PRUNE_METADATA_KEY, declared_pruning

__all__ = [
    "compress",
    "compress_with_report",
    "coreml_pipeline",
    "inspect_model",
    "load_program",
    "run_passes",
    "save",
]


def run_passes(prog, passes) -> None:
    """Run (name, pass instance) pairs in order, validating the program after each.

    A failure that is not already a MilsparseError is wrapped as PassError naming the pass and
    the passes that ran before it.
    """
    done: list[str] = []
    for name, graph_pass in passes:
        try:
            graph_pass(prog)
            prog.validate()
        except MilsparseError:
            raise
        except Exception as e:
            raise PassError(f"{type(e).__name__}: {e} in {name}, after [{', '.join(done)}]") from e
        done.append(name)


def load_program(model):
    """A fresh pymil Program of an MLModel or a saved .mlpackage (the input is not modified)."""
    return _io.load_program(_io.open_model(model))


def compress_with_report(
    model, config, *, target=None, output=None, overwrite: bool = False
) -> tuple[ct.models.MLModel, CompressReport]:
    """Like `compress`, and also return the per-weight report."""
    recipe = Recipe.coerce(config)
    target = _io.parse_target(target if target is not None else recipe.target)
    source = _io.open_model(model)
    if output is not None:
        # before any work: an output that would touch the input, or cannot be written
        _io.check_output_path(
            output,
            overwrite=overwrite,
            inputs=[_io.source_path(model)],
            needed_bytes=_io.package_bytes(model),
        )
    prog = _io.load_program(source)
    spec_version = _io.retarget(prog, source.get_spec().specificationVersion, target)
    # compressed weights of an older opset move to the new one's forms (or nothing loads it)
    upgrade_constexpr_ops(prog)
    prune = PruneWeights(recipe.prune)
    # The pass removes the consts it replaces, so no cleanup pass is needed afterwards.
    run_passes(prog, [("milsparse::prune", prune)])
    metadata = _pruned_metadata(source, prune.report)
    if output is None:
        compressed = _io.program_to_model(prog, spec_version, source, metadata)
    else:
        compressed = _io.write_program(
            prog, spec_version, source, output, overwrite=overwrite, metadata=metadata
        )
    opset = max(f.opset_version for f in prog.functions.values())
    notes = [
        f"override {pattern!r} matched no weight or op of this model"
        for pattern in prune.unused_overrides()
    ]
    return compressed, CompressReport(prune.report, target=opset.name, notes=notes)


def _pruned_metadata(source, decisions) -> dict[str, str]:
    """The model metadata entry recording each pruned weight's spec and axis, so `verify` can
    check the pattern later; merged with an earlier run's entry."""
    pruned = declared_pruning(source)
    for d in decisions:
        if d.compressed:
            pruned[d.name] = {"spec": d.spec, "axis": d.axis}
    return {PRUNE_METADATA_KEY: json.dumps(pruned, sort_keys=True)} if pruned else {}


def compress(
    model, config, *, target=None, output=None, overwrite: bool = False
) -> ct.models.MLModel:
    """Prune a saved ML program (path or MLModel) with a recipe; return the compressed MLModel.

    `config` is a Recipe, PruneConfig, PruneSpec, spec string ("2:4", "unstructured:0.5", ...) or
    mapping. `target` ("ios16" | "ios17" | "ios18" or a ct.target) raises the program's opset
    first; iOS18 emits the uint1-mask form. With `output`, the package is written there directly
    (atomically; an existing one only with `overwrite=True`) and the model is read back from it;
    without, it lives in a temporary folder removed with the returned model. The input is never
    modified and coremltools' default pipeline is not re-run.
    """
    return compress_with_report(model, config, target=target, output=output, overwrite=overwrite)[0]


def save(model: ct.models.MLModel, path, *, overwrite: bool = False) -> Path:
    """Save atomically (no half-written package) and deterministically (stable manifest ids)."""
    return _io.save_package(model, path, overwrite=overwrite)


def coreml_pipeline(config, base: ct.PassPipeline | None = None) -> ct.PassPipeline:
    """`base` (default: ct.PassPipeline.DEFAULT) with milsparse::prune placed after the passes
    that fold and fuse weights (conv+batchnorm, bias and scale fusion, fp16 cast, const folding
    and deduplication), configured with `config`."""
    recipe = Recipe.coerce(config)
    base = ct.PassPipeline.DEFAULT if base is None else base
    return place_in_pipeline(
        ["milsparse::prune"], base, options={"milsparse::prune": {"config": recipe.prune}}
    )


def inspect_model(model) -> InspectReport:
    """The weight table (format, sparsity, bytes) of an MLModel or saved package."""
    source = _io.open_model(model)
    path = str(model) if isinstance(model, (str, Path)) else None
    return InspectReport(weight_table(_io.load_program(source)), path=path)
