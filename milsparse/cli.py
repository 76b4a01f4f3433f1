"""The `milsparse` command: compress | verify | inspect | passes.

Exit codes: 0 done (verification passed); 1 verification failed; 2 an error the user can fix
(bad paths, non-mlprogram models, bad flag values), printed as one line on stderr; 3 an internal
error, also one line. No traceback unless --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class _StepFlag(argparse.Action):
    """A step flag: its value, and the order the step flags came in (`steps_order`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        order = [d for d in (getattr(namespace, "steps_order", None) or []) if d != self.dest]
        namespace.steps_order = [*order, self.dest]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="milsparse",
        description="Compress Core ML ML-program weights: pruning into sparse constexpr ops, "
        "palettization and linear quantization, alone or joint (iOS18).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_compress(sub)
    _add_verify(sub)
    _add_inspect(sub)
    _add_passes(sub)
    return parser


def _add_compress(sub) -> None:
    comp = sub.add_parser("compress", help="compress a saved .mlpackage into a new one")
    comp.add_argument("input", help="input .mlpackage (never modified)")
    comp.add_argument(
        "-o", "--output", required=True, help="output .mlpackage (written atomically)"
    )
    _step_flags(comp)
    _data_aware_flags(comp)
    _palettize_and_quantize_flags(comp)
    _selection_flags(comp)
    comp.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    comp.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="weights compressed at once, in threads (default: all cores; the output's bytes "
        "do not depend on it)",
    )
    comp.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: only when stderr is a terminal)",
    )
    comp.add_argument("--json", action="store_true", help="print the report as JSON")
    comp.add_argument(
        "--verify",
        action="store_true",
        help="verify the result against the input first; write nothing if it fails (exit 1)",
    )
    comp.add_argument(
        "--keep-failed",
        action="store_true",
        help="with --verify: write the output even if verification fails (still exit 1)",
    )
    _verify_options(comp)


def _step_flags(comp) -> None:
    """The step flags, run in the order given."""
    steps = comp.add_argument_group(
        "steps", "one or more, run in the order given on the command line (or --recipe)"
    )
    steps.add_argument(
        "--prune",
        metavar="SPEC",
        action=_StepFlag,
        help="unstructured:S | threshold:T | blockB[@in|@out]:S | N:M[@in|@out] (e.g. 2:4, "
        "block4:0.5)",
    )
    steps.add_argument(
        "--palettize",
        metavar="NBITS",
        action=_StepFlag,
        help="k-means look-up tables of 2^NBITS entries: 1, 2, 3, 4, 6, 8 (or a spec: lut4x2@g16)",
    )
    steps.add_argument(
        "--quantize",
        metavar="DTYPE",
        action=_StepFlag,
        help="linear quantization: int8 | uint8 | int4 | uint4 (or a spec: int4@b32:affine)",
    )
    steps.add_argument("--recipe", metavar="YAML", help="a recipe file (see docs/recipes.md)")


def _data_aware_flags(comp) -> None:
    data = comp.add_argument_group("data-aware pruning")
    data.add_argument(
        "--criterion",
        choices=["magnitude", "wanda", "sparsegpt"],
        help="how a prune step ranks weights (default magnitude; wanda and sparsegpt need "
        "--calibration)",
    )
    data.add_argument(
        "--calibration",
        metavar="NPZ",
        help="calibration inputs: arrays named after the model's inputs, leading sample axis",
    )
    data.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="calibrate each weight on the already-pruned weights' outputs (default: on for "
        "sparsegpt, off for wanda)",
    )
    data.add_argument(
        "--allocate",
        choices=["uniform", "global", "budget"],
        help="per-layer sparsity: uniform (default); global: the prune spec's sparsity over "
        "all selected weights, shared by measured sensitivity; budget: the most sparsity whose "
        "outputs keep --min-cosine / --min-snr on the calibration data",
    )
    data.add_argument(
        "--plot", metavar="PNG", help="draw the allocation's sensitivity curves (matplotlib)"
    )
    data.add_argument(
        "--dampening",
        type=float,
        metavar="D",
        help="sparsegpt: fraction of the Hessian's mean diagonal added to it (default 0.01)",
    )


def _palettize_and_quantize_flags(comp) -> None:
    lut = comp.add_argument_group("palettize options")
    lut.add_argument("--lut-mode", choices=["kmeans", "uniform"], help="default kmeans")
    lut.add_argument(
        "--lut-group-size",
        type=int,
        metavar="G",
        help="one table per G output channels (per_grouped_channel; iOS18); default one table",
    )
    lut.add_argument(
        "--cluster-dim",
        type=int,
        metavar="V",
        help="vector palettization: entries of V output channels' values (iOS18); default 1",
    )
    quant = comp.add_argument_group("quantize options")
    quant.add_argument(
        "--quant-mode", choices=["symmetric", "affine"], help="default symmetric (no zero point)"
    )
    quant.add_argument(
        "--quant-granularity",
        choices=["tensor", "channel", "block"],
        help="one scale per tensor, output channel (default), or output channel and block",
    )
    quant.add_argument(
        "--block-size",
        type=int,
        metavar="B",
        help="input channels per block with --quant-granularity block (default 32; iOS18)",
    )


def _selection_flags(comp) -> None:
    """Which weights every step touches, the target, and the magnitude options."""
    comp.add_argument(
        "--target",
        metavar="NAME",
        help="raise the program's opset first: ios16 | ios17 | ios18 | ios26 (or macOS13, ...)",
    )
    comp.add_argument(
        "--op-types",
        metavar="LIST",
        help="comma list, default linear,conv,conv_transpose,matmul (every step)",
    )
    comp.add_argument(
        "--op-names",
        metavar="LIST",
        help="comma list of fnmatch patterns of weights or ops (every step)",
    )
    comp.add_argument(
        "--min-size",
        type=int,
        metavar="N",
        help="leave weights with fewer elements alone (default 2048; every step)",
    )
    comp.add_argument(
        "--min-sparsity", type=float, metavar="S", help="threshold: leave dense below this sparsity"
    )
    comp.add_argument(
        "--scope",
        choices=["tensor", "channel"],
        help="unstructured: rank the whole tensor, or each output channel on its own "
        "(for convs with batchnorm folded in)",
    )


def _add_verify(sub) -> None:
    ver = sub.add_parser("verify", help="compare a compressed model's outputs with the reference's")
    ver.add_argument("reference", help="the dense .mlpackage")
    ver.add_argument("candidate", help="the compressed .mlpackage")
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    ver.add_argument(
        "--function", metavar="NAME", help="the function of a multifunction model to run "
        "(default: its default function)",
    )  # fmt: skip
    _verify_options(ver)


def _add_inspect(sub) -> None:
    insp = sub.add_parser("inspect", help="list a model's weights: format, sparsity, bytes")
    insp.add_argument("model", help=".mlpackage")
    insp.add_argument("--json", action="store_true", help="print JSON")


def _add_passes(sub) -> None:
    lst = sub.add_parser("passes", help="list milsparse passes and their ordering declarations")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.add_argument(
        "--recipe", metavar="YAML", help="check a recipe's steps as a chain and print it"
    )
    lst.add_argument("--target", metavar="NAME", help="with --recipe: the deployment target")
    lst.add_argument(
        "--dot", action="store_true", help="with --recipe: print the chain as a Graphviz graph"
    )


_VERIFY_OPTIONS = ("inputs", "samples", "seed", "min_snr", "min_cosine", "max_mismatch")


def _verify_options(parser) -> None:
    parser.add_argument(
        "--inputs", metavar="NPZ", help="inputs (.npz keyed by input name); default: generated"
    )
    parser.add_argument(
        "--samples", type=int, metavar="N", help="generated input samples (default 4)"
    )
    parser.add_argument("--seed", type=int, help="seed of generated inputs (default 0)")
    parser.add_argument(
        "--min-snr", type=float, metavar="DB", help="minimum SNR per output (default 15)"
    )
    parser.add_argument(
        "--min-cosine", type=float, metavar="C", help="minimum cosine per output (default 0.98)"
    )
    parser.add_argument(
        "--max-mismatch",
        type=float,
        metavar="F",
        help="integer and bool outputs: fraction of values allowed to differ (default 0)",
    )


def _verify_request(args):
    """The verify flags as a checked `VerifyOptions`."""
    from milsparse import options as opts

    return opts.VerifyOptions.build(
        args.inputs,
        tolerances=opts.VerifyOptions.tolerances_from(
            args.min_snr, args.min_cosine, args.max_mismatch
        ),
        samples=4 if args.samples is None else args.samples,
        seed=0 if args.seed is None else args.seed,
        function=getattr(args, "function", None),
        spelling=opts.CLI,
    )


_LUT_FLAGS = ("lut_mode", "lut_group_size", "cluster_dim")
_QUANT_FLAGS = ("quant_mode", "quant_granularity", "block_size")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _palettize_spec(args):
    import attrs

    from milsparse.passes.lut_config import parse_palettize_spec

    text = args.palettize.strip()
    spec = parse_palettize_spec(text if text.startswith("lut") else f"lut{text}")
    changes = {}
    if args.lut_mode is not None:
        changes["mode"] = args.lut_mode
    if args.lut_group_size is not None:
        changes |= {"granularity": "per_grouped_channel", "group_size": args.lut_group_size}
    if args.cluster_dim is not None:
        changes["cluster_dim"] = args.cluster_dim
    return attrs.evolve(spec, **changes) if changes else spec


def _quantize_spec(args):
    import attrs

    from milsparse.passes.quant_config import parse_quantize_spec

    spec = parse_quantize_spec(args.quantize)
    changes = {}
    if args.quant_mode is not None:
        changes["mode"] = {"symmetric": "linear_symmetric", "affine": "linear"}[args.quant_mode]
    if args.quant_granularity is not None:
        changes["granularity"] = f"per_{args.quant_granularity}"
    if args.block_size is not None:
        if (args.quant_granularity or spec.granularity.removeprefix("per_")) != "block":
            raise _config_error("--block-size applies with --quant-granularity block")
        changes["block_size"] = args.block_size
    return attrs.evolve(spec, **changes) if changes else spec


def _config_error(message):
    from milsparse.errors import ConfigError

    return ConfigError(message)


def _prune_spec(args, spec):
    import attrs

    if args.min_sparsity is not None:
        if spec.pattern != "threshold":
            raise _config_error("--min-sparsity applies to threshold:T pruning only")
        spec = attrs.evolve(spec, min_sparsity=args.min_sparsity)
    if args.scope is not None:
        if spec.pattern != "magnitude":
            raise _config_error("--scope applies to unstructured:S pruning only")
        spec = attrs.evolve(spec, scope=args.scope)
    return spec


def _recipe_from_args(args):
    """The recipe of the step flags (in their command-line order) or of --recipe, with the
    selection and option flags applied."""
    import attrs

    from milsparse.passes.prune_config import parse_prune_spec
    from milsparse.recipe import Recipe, Step

    order = getattr(args, "steps_order", None) or []
    if args.recipe and order:
        raise _config_error(
            f"--recipe or step flags ({', '.join(map(_flag, order))}), not both: put the steps "
            "in the recipe"
        )
    if not args.recipe and not order:
        raise _config_error("give --prune, --palettize, --quantize (one or more) or --recipe")
    for kind, flags in (("palettize", _LUT_FLAGS), ("quantize", _QUANT_FLAGS)):
        given = [_flag(f) for f in flags if getattr(args, f) is not None]
        if given and (args.recipe or kind not in order):
            verb = "applies" if len(given) == 1 else "apply"
            raise _config_error(f"{', '.join(given)} {verb} with --{kind} only")
    if args.recipe:
        recipe = Recipe.from_yaml(args.recipe)
        steps = list(recipe.steps)
    else:
        recipe = None
        build = {
            "prune": lambda: parse_prune_spec(args.prune),
            "palettize": lambda: _palettize_spec(args),
            "quantize": lambda: _quantize_spec(args),
        }
        steps = [Step(kind, build[kind]()) for kind in order]
    data_flags = [
        _flag(f)
        for f in ("criterion", "sequential", "dampening", "allocate")
        if getattr(args, f) is not None
    ]
    if (args.min_sparsity is not None or args.scope is not None or data_flags) and not any(
        s.kind == "prune" for s in steps
    ):
        raise _config_error(
            "--min-sparsity, --scope, --criterion, --sequential and --dampening apply to a "
            "prune step"
        )
    changes = {}
    if args.op_types is not None:
        changes["op_types"] = args.op_types
    if args.op_names is not None:
        changes["op_names"] = args.op_names
    if args.min_size is not None:
        changes["min_size"] = args.min_size
    out = []
    for step in steps:
        config = attrs.evolve(step.config, **changes) if changes else step.config
        if step.kind == "prune":
            config = attrs.evolve(config, spec=_prune_spec(args, config.spec))
            data = {
                f: getattr(args, f) for f in ("criterion", "sequential", "dampening", "allocate")
            }
            if args.allocate == "budget":
                data |= {"min_cosine": args.min_cosine, "min_snr": args.min_snr}
            data = {k: v for k, v in data.items() if v is not None}
            if data:
                config = attrs.evolve(config, **data)
        out.append(Step(step.kind, config))
    target = args.target or (recipe.target if recipe else None)
    return Recipe(out, target)


def _identity(path: Path):
    """What tells one package at `path` from another (its folder's inode and time), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _cmd_compress(args) -> int:
    """Flags -> `CompressOptions` (and `VerifyOptions` with --verify), checked before any
    work; then the run. An interrupt after the output was moved into place says so (the
    package is complete: the move is atomic)."""
    dst = Path(args.output)
    before = _identity(dst)
    try:
        return _compress(args)
    except (KeyboardInterrupt, _Terminated) as e:
        if _identity(dst) not in (None, before):
            e.written = dst
        raise


def _compress(args) -> int:
    import dataclasses

    import milsparse as ms
    from milsparse import options as opts
    from milsparse.api import run_compress
    from milsparse.errors import ConfigError
    from milsparse.verification import run_verify

    src, dst = Path(args.input), Path(args.output)
    if args.keep_failed and not args.verify:
        raise ConfigError("--keep-failed applies with --verify")
    if not args.verify:
        floors = ("min_snr", "min_cosine") if args.allocate == "budget" else ()
        given = [
            f"--{o.replace('_', '-')}"
            for o in _VERIFY_OPTIONS
            if getattr(args, o) is not None and o not in floors
        ]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --verify")
    # Every check, the output's included, before any work (nothing learned only after).
    options = opts.CompressOptions.build(
        src,
        _recipe_from_args(args),
        output=dst,
        overwrite=args.force,
        calibration=args.calibration,
        plot=args.plot,
        jobs=args.jobs,
        progress=args.progress,
        spelling=opts.CLI,
    )
    verdict = None
    if args.verify:
        checks = _verify_request(args)
        # verify the model in its temporary package; a failing one is written with
        # --keep-failed only
        model, report = run_compress(dataclasses.replace(options, output=None))
        verdict = run_verify(src, model, checks)
        if verdict.passed or args.keep_failed:
            ms.save(model, dst, overwrite=args.force)
    else:
        _, report = run_compress(options)
    written = verdict is None or verdict.passed or args.keep_failed
    if args.json:
        out = {"input": str(src), "output": str(dst) if written else None, **report.to_dict()}
        if verdict is not None:
            out["verify"] = verdict.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print(report)
        if verdict is not None:
            print()
            print(verdict)
        if verdict is not None and not verdict.passed:
            print(_failed_hint(dst, args.keep_failed))
        else:
            print(f"wrote {dst}")
    return EXIT_OK if verdict is None or verdict.passed else EXIT_FAILED


def _failed_hint(dst, kept: bool) -> str:
    done = f"{dst} written anyway (--keep-failed)" if kept else f"{dst} not written"
    return (
        f"verification failed; {done}\n"
        "to try: less sparsity or more bits, data-aware pruning (--criterion sparsegpt "
        "--calibration FILE.npz), real inputs (--inputs FILE.npz), looser bounds (--min-snr, "
        "--min-cosine)" + ("" if kept else ", or --keep-failed to write it anyway")
    )


def _cmd_verify(args) -> int:
    from milsparse.verification import run_verify

    report = run_verify(args.reference, args.candidate, _verify_request(args))
    print(report.to_json() if args.json else report)
    return EXIT_OK if report.passed else EXIT_FAILED


def _cmd_inspect(args) -> int:
    import milsparse as ms

    report = ms.inspect_model(args.model)
    print(report.to_json() if args.json else report)
    return EXIT_OK


def _cmd_passes(args) -> int:
    if args.recipe is None:  # the declarations alone: no coremltools import
        from milsparse.passes.catalog import OWN_PASSES

        if args.dot or args.target:
            raise _config_error("--dot and --target apply with --recipe")
        return _list_passes(OWN_PASSES, args.json)
    from milsparse import targets
    from milsparse.api import check_recipe
    from milsparse.passes.registry import chain_dot
    from milsparse.recipe import Recipe
    from milsparse.report import format_table

    recipe = Recipe.from_yaml(args.recipe)
    target = targets.parse_target(args.target if args.target is not None else recipe.target)
    taken = check_recipe(recipe, target)
    if args.dot:
        print(chain_dot(taken, name=Path(args.recipe).stem))
    elif args.json:
        rows = [
            {"step": step.label, "pass": step.pass_name, "states": [list(e) for e in edges]}
            for step, edges in taken
        ]
        print(json.dumps({"target": getattr(target, "name", None), "steps": rows}, indent=2))
    else:
        rows = [
            [step.label, step.pass_name, ", ".join(f"{a} -> {b}" for a, b in edges) or "-"]
            for step, edges in taken
        ]
        print(format_table(["step", "pass", "weight states"], rows))
    return EXIT_OK


def _list_passes(passes, as_json: bool) -> int:
    from milsparse.passes.catalog import target_name
    from milsparse.report import format_table

    specs = sorted(passes.values(), key=lambda s: s.name)
    if as_json:
        rows = [
            {
                "name": s.name,
                "summary": s.summary,
                "requires": list(s.requires),
                "after": list(s.after),
                "before": list(s.before),
                "conflicts": list(s.conflicts),
                "min_target": target_name(s.min_target),
                "transforms": [[c, p, target_name(t)] for c, p, t in s.transforms],
            }
            for s in specs
        ]
        print(json.dumps(rows, indent=2))
    else:
        print(
            format_table(
                ["pass", "min target", "weight states", "summary"],
                [
                    [
                        s.name,
                        target_name(s.min_target),
                        ", ".join(f"{c}->{p}" for c, p, _ in s.transforms) or "-",
                        s.summary,
                    ]
                    for s in specs
                ],
            )
        )
    return EXIT_OK


_COMMANDS = {
    "compress": _cmd_compress,
    "verify": _cmd_verify,
    "inspect": _cmd_inspect,
    "passes": _cmd_passes,
}


@contextlib.contextmanager
def _quiet_coremltools(debug: bool):
    """Errors are printed by us, once; coremltools' own warnings would only repeat them (shown
    with --debug). Its logger level is put back after the command."""
    import logging

    logger = logging.getLogger("coremltools")
    previous = logger.level
    if not debug:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that every `finally` and context manager
    cleans up on the way out, exactly as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


@contextlib.contextmanager
def _terminate_cleanly():
    handled = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {}
    try:
        for signum in handled:
            previous[signum] = signal.signal(signum, _raise_terminated)
    except ValueError:  # not the main thread (an embedding application): leave signals alone
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _written_note(e: BaseException) -> str:
    written = getattr(e, "written", None)
    return "" if written is None else f" after {written} was written (it is complete)"


def _report(message: str, debug: bool, code: int) -> int:
    """One line on stderr; with --debug the traceback first. The exit code does not change."""
    if debug:
        traceback.print_exc()
    print(message, file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.debug:
        _replay_import_notes()
    with _terminate_cleanly(), _quiet_coremltools(args.debug):
        try:
            from milsparse.errors import InternalError, MilsparseError

            return _COMMANDS[args.command](args)
        except InternalError as e:  # a bug inside a pass, named by run_passes
            return _report(
                f"milsparse: internal error: {e} (rerun with --debug)", args.debug, EXIT_INTERNAL
            )
        except MilsparseError as e:
            return _report(f"milsparse: error: {e}", args.debug, EXIT_USAGE)
        except KeyboardInterrupt as e:
            print(f"milsparse: interrupted{_written_note(e)}", file=sys.stderr)
            return 130
        except _Terminated as e:
            name = signal.Signals(e.signum).name
            print(f"milsparse: terminated by {name}{_written_note(e)}", file=sys.stderr)
            return 128 + e.signum
        except Exception as e:  # an internal failure: one line, the traceback with --debug
            return _report(
                f"milsparse: internal error: {type(e).__name__}: {e} (rerun with --debug)",
                args.debug,
                EXIT_INTERNAL,
            )


def _replay_import_notes() -> None:
    """--debug shows what importing coremltools logged (hidden otherwise: see
    milsparse.ct_import)."""
    import coremltools  # noqa: F401

    import milsparse

    for record in milsparse.IMPORT_NOTES:
        print(f"coremltools (on import): {record}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
