"""The `milsparse` command: compress | inspect | passes.

Errors a user can fix (bad paths, non-mlprogram models, bad flag values) print one line on
stderr and exit 2; no traceback unless --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="milsparse", description="Prune Core ML ML-program weights into sparse constexpr ops."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    comp = sub.add_parser("compress", help="prune a saved .mlpackage into a new one")
    comp.add_argument("input", help="input .mlpackage (never modified)")
    comp.add_argument(
        "-o", "--output", required=True, help="output .mlpackage (written atomically)"
    )
    how = comp.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--prune",
        metavar="SPEC",
        help="unstructured:S | threshold:T | blockB[@0|@1]:S | N:M[@0|@1] (e.g. 2:4, block4:0.5)",
    )
    how.add_argument("--recipe", metavar="YAML", help="a recipe file (see README: Recipes)")
    comp.add_argument(
        "--target", choices=["ios16", "ios17", "ios18"], help="raise the program's opset first"
    )
    comp.add_argument(
        "--op-types", metavar="LIST", help="comma list, default linear,conv,conv_transpose,matmul"
    )
    comp.add_argument(
        "--op-names", metavar="LIST", help="comma list of fnmatch patterns of weights or ops"
    )
    comp.add_argument(
        "--min-size",
        type=int,
        metavar="N",
        help="leave weights with fewer elements dense (default 2048)",
    )
    comp.add_argument(
        "--min-sparsity", type=float, metavar="S", help="threshold: leave dense below this sparsity"
    )
    comp.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    comp.add_argument("--json", action="store_true", help="print the report as JSON")

    insp = sub.add_parser("inspect", help="list a model's weights: format, sparsity, bytes")
    insp.add_argument("model", help=".mlpackage")
    insp.add_argument("--json", action="store_true", help="print JSON")

    lst = sub.add_parser("passes", help="list milsparse passes and their ordering declarations")
    lst.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _recipe_from_args(args):
    import attrs

    from milsparse.errors import ConfigError
    from milsparse.passes.config import PruneConfig, parse_prune_spec
    from milsparse.recipe import Recipe

    if args.recipe:
        recipe = Recipe.from_yaml(args.recipe)
        prune = recipe.prune
    else:
        recipe = None
        prune = PruneConfig(spec=parse_prune_spec(args.prune))
    changes = {}
    if args.op_types is not None:
        changes["op_types"] = args.op_types
    if args.op_names is not None:
        changes["op_names"] = args.op_names
    if args.min_size is not None:
        changes["min_size"] = args.min_size
    if changes:
        prune = attrs.evolve(prune, **changes)
    if args.min_sparsity is not None:
        if prune.spec.pattern != "threshold":
            raise ConfigError("--min-sparsity applies to threshold:T pruning only")
        prune = attrs.evolve(prune, spec=attrs.evolve(prune.spec, min_sparsity=args.min_sparsity))
    target = args.target or (recipe.target if recipe else None)
    return Recipe(prune=prune, target=target)


def _cmd_compress(args) -> int:
    from pathlib import Path

    import milsparse as ms
    from milsparse.errors import ConfigError

    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        raise ConfigError(f"{src}: no such file or directory")
    if dst.suffix != ".mlpackage":
        raise ConfigError(f"{dst}: output must end in .mlpackage")
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise ConfigError("output is the input; milsparse never modifies its input")
    if dst.exists() and not args.force:
        raise ConfigError(f"{dst} exists; pass --force to overwrite it")
    recipe = _recipe_from_args(args)
    _, report = ms.compress_with_report(src, recipe, output=dst, overwrite=args.force)
    if args.json:
        print(json.dumps({"input": str(src), "output": str(dst), **report.to_dict()}, indent=2))
    else:
        print(report)
        print(f"wrote {dst}")
    return EXIT_OK


def _cmd_inspect(args) -> int:
    import milsparse as ms

    report = ms.inspect_model(args.model)
    print(report.to_json() if args.json else report)
    return EXIT_OK


def _cmd_passes(args) -> int:
    import milsparse  # noqa: F401  (registers the passes)
    from milsparse.passes.registry import MILSPARSE_PASSES
    from milsparse.report import format_table

    specs = sorted(MILSPARSE_PASSES.values(), key=lambda s: s.name)
    if args.json:
        rows = [
            {
                "name": s.name,
                "summary": s.summary,
                "requires": list(s.requires),
                "after": list(s.after),
                "before": list(s.before),
                "conflicts": list(s.conflicts),
                "min_target": s.min_target.name,
            }
            for s in specs
        ]
        print(json.dumps(rows, indent=2))
    else:
        print(
            format_table(
                ["pass", "min target", "summary"],
                [[s.name, s.min_target.name, s.summary] for s in specs],
            )
        )
    return EXIT_OK


_COMMANDS = {"compress": _cmd_compress, "inspect": _cmd_inspect, "passes": _cmd_passes}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if not args.debug:
        # Errors are printed by us, once; coremltools' own warnings would only repeat them.
        logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        from milsparse.errors import MilsparseError

        return _COMMANDS[args.command](args)
    except MilsparseError as e:
        if args.debug:
            raise
        print(f"milsparse: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("milsparse: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal failure: still one line, the traceback behind --debug
        if args.debug:
            raise
        print(
            f"milsparse: internal error: {type(e).__name__}: {e} (rerun with --debug)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
