"""The public functions: compress a model, build a ct.convert pipeline, inspect a model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import coremltools as ct

from milsparse import package, staging, targets
from milsparse.errors import ConfigError, InternalError, MilsparseError
from milsparse.ir.blobs import Spill
from milsparse.ir.chain import Form, weight_chain
from milsparse.ir.graph import walk_ops
from milsparse.ir.weights import weight_table
from milsparse.options import CompressOptions
from milsparse.passes import program_edits
from milsparse.passes.decisions import combine
from milsparse.passes.registry import ChainStep, check_chain, place_in_pipeline
from milsparse.passes.run_context import ReportSink, RunContext, sink_for
from milsparse.passes.upgrade import upgrade_constexpr_ops
from milsparse.pruning_metadata import pruned_metadata
from milsparse.recipe import Recipe
from milsparse.report import CompressReport, InspectReport

__all__ = [
    "compress",
    "compress_with_report",
    "check_recipe",
    "conversion_report",
    "convert",
    "convert_with_report",
    "coreml_pipeline",
    "inspect_model",
    "load_program",
    "run_compress",
    "run_passes",
    "save",
]


def run_passes(prog, passes) -> CompressReport:
    """Run (name, pass instance) pairs in order, validating the program after each; return the
    per-weight report of the passes that keep one (milsparse's own, or any with a `report`
    list of decisions), combined as `compress` reports them.

    A MilsparseError raised inside a pass (a user error it found) passes through as it is; any
    other exception is a bug, wrapped as InternalError (a PassError) naming the pass and the
    passes that ran before it, the original as its cause.
    """
    done: list[str] = []
    passes = list(passes)
    for name, graph_pass in passes:
        try:
            graph_pass(prog)
            prog.validate()
        except (MilsparseError, OSError):  # OSError: the disk, not the pass (a full spill)
            raise
        except Exception as e:
            raise InternalError(
                f"{type(e).__name__}: {e} in {name}, after [{', '.join(done)}]"
            ) from e
        done.append(name)
    ran = [
        (name, p.report, p.unused_overrides() if hasattr(p, "unused_overrides") else [])
        for name, p in passes
        if isinstance(getattr(p, "report", None), list)
    ]
    opset = max((f.opset_version for f in prog.functions.values() if f.opset_version), default=None)
    return _combined_report(ran, getattr(opset, "name", None))


def _combined_report(ran, target) -> CompressReport:
    """One report of the passes that ran, `(pass name, decisions, unused override patterns)`
    in their order: a row per weight (`combine`), a note per unused override."""
    many = len(ran) > 1
    notes = [
        f"{name.partition('::')[2] or name}: " * many
        + f"override {pattern!r} matched no weight or op of this model"
        for name, _, unused in ran
        for pattern in unused
    ]
    decisions = combine([(name.partition("::")[2] or name, rows) for name, rows, _ in ran])
    return CompressReport(decisions, target=target, notes=notes)


def load_program(model):
    """A fresh pymil Program of an MLModel or a saved .mlpackage (the input is not modified)."""
    return package.load_program(package.open_model(model))


def compress_with_report(
    model,
    config,
    *,
    target=None,
    output=None,
    overwrite: bool = False,
    calibration=None,
    plot=None,
    jobs: int | None = None,
    progress: bool | None = None,
) -> tuple[ct.models.MLModel, CompressReport]:
    """Like `compress`, and also return the per-weight report."""
    options = CompressOptions.build(
        model,
        config,
        target=target,
        output=output,
        overwrite=overwrite,
        calibration=calibration,
        plot=plot,
        jobs=jobs,
        progress=progress,
    )
    return run_compress(options)


def run_compress(options: CompressOptions, prog=None) -> tuple[ct.models.MLModel, CompressReport]:
    """Run a checked compress request (`milsparse.options.CompressOptions`, whose `build`
    checked every option and the output path): the compressed model and its report. `prog`:
    the model's program, when the caller has loaded it already (it is compressed in place)."""
    recipe, target, source, output = options.recipe, options.target, options.model, options.output
    prune_step = recipe.step("prune")
    show = options.progress
    if prog is None:
        prog = package.load_program(source, show)
    samples = None
    if options.calibration is not None:
        samples = _calibration_samples(prog, options.calibration)
    # The passes' new values go to a scratch file beside the output as they are made, and the
    # program maps them: the output's weights are on disk, not in memory, until written.
    with staging.spill_folder(output) as folder:
        if prune_step is not None and prune_step.config.allocate == "budget":
            del prog  # every attempt loads its own; only one program at a time is kept
            prog, spec_version, opset, steps, report, budget_notes = _budget_search(
                source, recipe, target, samples, folder, options.jobs, show
            )
        else:
            prog, spec_version, opset, steps, report = _run_recipe(
                source, recipe, target, samples, prog, Spill(folder), options.jobs, show
            )
            budget_notes = []
        prune = next((p for step, p in steps if step.kind == "prune"), None)
        metadata = pruned_metadata(source, prune.report if prune is not None else [])
        if output is None:
            compressed = package.program_to_model(prog, spec_version, source, metadata, show)
        else:
            compressed = package.write_program(
                prog, spec_version, source, output, overwrite=options.overwrite,
                metadata=metadata, show_progress=show,
            )  # fmt: skip
        del prog  # its maps of the scratch file
    report.target = opset.name
    report.notes += budget_notes
    report.allocation = {c.name: c.to_dict() for c in getattr(prune, "allocation", [])}
    if options.plot is not None:
        from milsparse.plot import plot_allocation

        plot_allocation(report.allocation, options.plot)
    return compressed, report


def _run_recipe(
    source, recipe: Recipe, target, samples, prog=None, spill=None, jobs=1, show_progress=None
):
    """Retarget, check and run `recipe` on `prog` (default: a fresh program of `source`):
    (program, spec version, opset, [(step, pass)], report). With `spill` (an `ir.blobs.Spill`), the
    values the passes produce go to disk as they are made; the program maps them."""
    if prog is None:
        prog = package.load_program(source, show_progress)
    raised = program_edits.below(prog, ct.target.iOS16) if target is None else []
    if raised:  # compressed weights need iOS16's constexpr ops: raise it, as coremltools does
        target = ct.target.iOS16
    spec_version = program_edits.retarget(prog, source.get_spec().specificationVersion, target)
    # compressed weights of an older opset move to the new one's forms (or nothing loads it)
    upgrade_constexpr_ops(prog, spill)
    opset = max(f.opset_version for f in prog.functions.values())
    check_recipe(recipe, opset if opset >= ct.target.iOS16 else None, weight_states(prog))
    context = RunContext(calibration=samples, jobs=jobs, spill=spill, progress=show_progress)
    steps = [(step, step.make_pass(context)) for step in recipe.steps]
    # The passes remove the consts they replace, so no cleanup pass is needed afterwards.
    report = run_passes(prog, [(step.pass_name, p) for step, p in steps])
    if raised:
        report.notes.append(
            f"raised {', '.join(raised)} to iOS16: compressed weights need iOS16 or later (the "
            "model no longer loads on iOS15; give a target to choose a later one)"
        )
    return prog, spec_version, opset, steps, report


BUDGET_STEPS = 7


def _budget_search(
    source, recipe: Recipe, target, samples, spill_folder, jobs=1, show_progress=None
):
    """allocate budget: the largest overall sparsity (global allocation) whose outputs on the
    calibration samples keep the floor (min_cosine / min_snr, per output against the dense
    model), by bisection over [0, 0.9] in BUDGET_STEPS steps; every candidate is run through
    the interpreter before it is accepted. Returns what `_run_recipe` does, and notes."""
    import attrs

    from milsparse.ir.cursor import run_samples
    from milsparse.metrics import Tolerances, compare_outputs

    prune_step = recipe.step("prune")
    cfg = prune_step.config
    floor = Tolerances(min_snr_db=cfg.min_snr, min_cosine=cfg.min_cosine)
    dense = package.load_program(source, show_progress)
    function = next(iter(dense.functions))
    references = run_samples(dense, samples, function)
    del dense

    def attempt(sparsity: float):
        spec = attrs.evolve(cfg.spec, sparsity=sparsity)
        config = attrs.evolve(cfg, spec=spec, allocate="global", min_cosine=None, min_snr=None)
        steps = [s if s.kind != "prune" else type(s)("prune", config) for s in recipe.steps]
        spill = Spill(spill_folder)  # each attempt's values in their own file
        try:
            result = _run_recipe(
                source, recipe.with_steps(steps), target, samples, None, spill, jobs,
                show_progress,
            )  # fmt: skip
            outputs = run_samples(result[0], samples, function)
            ok = all(not m.failures for m in compare_outputs(references, outputs, floor))
        except BaseException:
            spill.close()
            raise
        if not ok:
            spill.close()
        return result, ok, spill

    best, best_s, best_spill, tried = None, 0.0, None, []
    low, high = 0.0, 0.9
    result, ok, spill = attempt(high)
    tried.append((high, ok))
    if ok:
        best, best_s, best_spill = result, high, spill
    else:
        for _ in range(BUDGET_STEPS):
            middle = round((low + high) / 2, 6)
            result, ok, spill = attempt(middle)
            tried.append((middle, ok))
            if ok:
                if best_spill is not None:
                    best_spill.close()
                best, best_s, best_spill, low = result, middle, spill, middle
            else:
                high = middle
    floor_text = ", ".join(
        f"{k} {v:g}" for k, v in (("min_cosine", cfg.min_cosine), ("min_snr", cfg.min_snr))
        if v is not None
    )  # fmt: skip
    tried_text = ", ".join(f"{s:.3f} {'ok' if ok else 'below'}" for s, ok in tried)
    if best is None:
        raise ConfigError(
            f"allocate budget: no sparsity keeps the outputs within {floor_text} on the "
            f"calibration data (tried {tried_text})"
        )
    notes = [
        f"allocate budget: overall sparsity {best_s:.3f} keeps {floor_text} on the "
        f"calibration data (tried {tried_text})"
    ]
    return (*best, notes)


def _calibration_samples(prog, calibration) -> list[dict]:
    """Checked calibration samples for the program's function (one function only)."""
    from milsparse.ir.calibration import check_samples
    from milsparse.ir.samples import as_samples

    if len(prog.functions) > 1:
        raise ConfigError(
            "calibration (data-aware pruning) supports single-function programs; this one has "
            f"functions {sorted(prog.functions)}"
        )
    function = next(iter(prog.functions))
    samples = as_samples(calibration, prog.functions[function], what="calibration")
    return check_samples(prog, samples, function)


def weight_states(prog) -> set[str]:
    """The weight states (`milsparse.passes.registry.WEIGHT_STATES`) present in `prog`, and
    "dense"."""
    states = {"dense"}
    for func in prog.functions.values():
        for op in walk_ops(func):
            chain = weight_chain(op)
            if chain is not None and chain.form is not Form.CAST:
                states.add(chain.form.value)
    return states


def check_recipe(recipe: Recipe, target=None, start=("dense",)):
    """`check_chain` over a recipe's steps (labels `1 (prune 2:4)`); a step with `op_names`
    leaves the other weights as they were. `target`: a `ct.target` or a name ("ios18"), as
    `compress` takes it. Returns what `check_chain` does."""
    recipe = Recipe.coerce(recipe)
    if isinstance(target, str):
        target = targets.parse_target(target)
    return check_chain(
        [
            ChainStep(f"{i} ({step.describe()})", step.pass_name, not step.config.op_names)
            for i, step in enumerate(recipe.steps, 1)
        ],
        target,
        start,
    )


def compress(
    model,
    config,
    *,
    target=None,
    output=None,
    overwrite: bool = False,
    calibration=None,
    plot=None,
    jobs: int | None = None,
    progress: bool | None = None,
) -> ct.models.MLModel:
    """Compress a saved ML program (path or MLModel) with a recipe; return the compressed
    MLModel.

    `config` is a Recipe, a step (a prune, palettize or quantize config or spec, or a spec
    string: "2:4", "unstructured:0.5", "lut4", "int8@b32", ...), a list of steps run in order
    (`["2:4", "lut4"]`), or a recipe mapping. The steps are checked as a chain first
    (`check_recipe`). `target` ("ios16" | "ios17" | "ios18" or a ct.target) raises the
    program's opset first; iOS18 emits the uint1-mask form and the joint forms. With `output`,
    the package is written there directly (atomically; an existing one only with
    `overwrite=True`) and the model is read back from it; without, it lives in a temporary
    folder removed with the returned model. The input is never modified and coremltools'
    default pipeline is not re-run.

    `calibration` (a list of {input name: array} samples, or an .npz whose arrays are named
    after the inputs with a leading sample axis) feeds the data-aware criteria of a prune step
    (`criterion: wanda | sparsegpt`): the reference interpreter runs the samples and hands
    each weight's consumer its input activations, and the per-layer sparsity of
    `allocate: global | budget`; with it, palettize and quantize steps weight their fits by
    each input column's activation energy. `plot` (a .png path) draws an allocation's curves.

    `jobs` weights are compressed at once in threads (default: every core); the output's bytes
    are the same for any number (rewrites are applied in program order). Sequential
    calibration (sparsegpt's default) and multifunction programs run one weight at a time.

    `progress`: progress bars on stderr for loading, each step and writing: None (the
    default) shows them only when stderr is a terminal, so a script or notebook prints
    nothing unless asked; True always; False never.
    """
    return compress_with_report(
        model,
        config,
        target=target,
        output=output,
        overwrite=overwrite,
        calibration=calibration,
        plot=plot,
        jobs=jobs,
        progress=progress,
    )[0]


def save(model, path, *, overwrite: bool = False) -> Path:
    """Save an MLModel or a pymil Program as an .mlpackage at `path`, atomically (no
    half-written package; an existing one replaced only with `overwrite=True`) and
    deterministically (stable manifest ids). A Program is written at the specification version
    its opsets need, its weights streamed into the package's weight file; identical consts are
    written once (their ops get the same `weight_id`, the only change made to the Program)."""
    if package.is_program(model):
        spec_version = package.program_spec_version(model)
        written = package.write_program(model, spec_version, None, path, overwrite=overwrite)
        return Path(written.package_path)
    return package.save_package(model, path, overwrite=overwrite)


def coreml_pipeline(config, base: ct.PassPipeline | None = None, *, target=None) -> ct.PassPipeline:
    """`base` (default: ct.PassPipeline.DEFAULT) with the recipe's passes placed, in the
    recipe's order, after the passes that fold and fuse weights (conv+batchnorm, bias and scale
    fusion, fp16 cast, const folding and deduplication), each configured with its step.

    The steps are checked as a chain first (against `target`, or the recipe's, when given: pass
    the `minimum_deployment_target` you convert with). Each pass leaves its report under a key
    this pipeline carries, for `conversion_report` (or use `milsparse.convert`)."""
    recipe = Recipe.coerce(config)
    target = targets.parse_target(target if target is not None else recipe.target)
    check_recipe(recipe, target)
    base = ct.PassPipeline.DEFAULT if base is None else base
    sink = ReportSink()
    options = {s.pass_name: {"config": s.config, "run": sink.key} for s in recipe.steps}
    pipeline = place_in_pipeline(recipe.pass_names, base, options=options)
    pipeline.milsparse_reports = sink  # the sink lives as long as the pipeline
    return pipeline


def _run_key(pipeline: ct.PassPipeline) -> str | None:
    for name in pipeline.passes:
        for option in pipeline.get_options(name) or ():
            if option.option_name == "run":
                return str(option.option_val)
    return None


def conversion_report(model: ct.models.MLModel, pipeline: ct.PassPipeline) -> CompressReport:
    """The per-weight report of the milsparse passes of `pipeline` (from `coreml_pipeline`)
    in the `ct.convert(..., pass_pipeline=pipeline)` that made `model`; also records in
    `model`'s metadata the pruning patterns `verify` checks, as `compress` does (saved with
    the model). Call it right after the conversion: a later conversion with the same pipeline
    replaces the report."""
    sink = getattr(pipeline, "milsparse_reports", None) or sink_for(_run_key(pipeline))
    found = sink.reports if sink is not None else None
    if not found:
        raise ConfigError(
            "no milsparse pass of this pipeline has run: build it with "
            "milsparse.coreml_pipeline(recipe) and convert with ct.convert(..., "
            "pass_pipeline=pipeline) first"
        )
    final = _final_names(model)
    ran = [
        (name, [_renamed(d, final) for d in found[name][0]], found[name][1])
        for name in pipeline.passes
        if name in found
    ]
    prune = next((rows for name, rows, _ in ran if name == "milsparse::prune"), [])
    for key, value in pruned_metadata(model, prune).items():
        model.user_defined_metadata[key] = value
    target = f"spec version {model.get_spec().specificationVersion}"
    return _combined_report(ran, target)


def _final_names(model) -> set[str]:
    """The weight names of the converted model (its backend pipeline sanitizes names)."""
    prog = getattr(model, "_mil_program", None)
    if prog is None:
        prog = package.load_program(model)
    return {row.name for row in weight_table(prog)}


def _renamed(decision, final: set[str]):
    """`decision` under the name the backend gave its weight (`head.weight` -> `head_weight`,
    `0.weight` -> `op_0_weight`, as coremltools' sanitize_name pass renames ops, or with the
    prefix it gives vars)."""
    if decision.name in final:
        return decision
    from coremltools.converters.mil.mil.passes.defs.preprocess import NameSanitizer

    for prefix in ("op_", "var_"):
        name = NameSanitizer(prefix=prefix).sanitize_name(decision.name)
        if name in final:
            return dataclasses.replace(decision, name=name)
    return decision


def convert_with_report(source, config, *, base=None, **convert_options):
    """`ct.convert(source, pass_pipeline=coreml_pipeline(config, base), **convert_options)`
    and its `conversion_report`. The recipe's target is the default
    `minimum_deployment_target`."""
    recipe = Recipe.coerce(config)
    if "pass_pipeline" in convert_options:
        raise ConfigError("convert builds the pass pipeline itself: give base= instead")
    target = convert_options.get("minimum_deployment_target")
    if target is None and recipe.target is not None:
        target = targets.parse_target(recipe.target)
        convert_options["minimum_deployment_target"] = target
    pipeline = coreml_pipeline(recipe, base, target=target)
    convert_options.setdefault("convert_to", "mlprogram")
    model = ct.convert(source, pass_pipeline=pipeline, **convert_options)
    return model, conversion_report(model, pipeline)


def convert(source, config, *, base=None, **convert_options) -> ct.models.MLModel:
    """Convert a torch / TensorFlow model with the recipe's passes inside coremltools'
    pipeline (see `convert_with_report`); the model carries the same metadata as one made by
    `compress`."""
    return convert_with_report(source, config, base=base, **convert_options)[0]


def inspect_model(model) -> InspectReport:
    """The weight table (format, sparsity, bytes) of an MLModel, saved package or Program."""
    if package.is_program(model):
        return InspectReport(weight_table(model))
    source = package.open_model(model)
    path = str(model) if isinstance(model, (str, Path)) else None
    return InspectReport(weight_table(package.load_program(source)), path=path)
