"""The docs' lists that mirror code stay true to it: the interpreter's ops (docs/verify.md),
every CLI option (docs/cli.md) and the benchmark tables (docs/benchmarks.md, rendered from
benchmarks/results/*.json)."""

import re
from pathlib import Path

from milsparse.ir.interpreter import KERNELS, load_kernels

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_the_verify_page_lists_exactly_the_interpreter_ops():
    load_kernels()
    text = (DOCS / "verify.md").read_text()
    block = re.search(r"<!-- ops -->(.*?)<!-- /ops -->", text, re.S).group(1)
    listed = re.findall(r"`([a-z0-9_]+)`", block)
    assert listed == sorted(KERNELS)
    assert f"Ops with a kernel ({len(KERNELS)})" in text


def test_the_readme_counts_the_interpreter_ops():
    load_kernels()
    assert f"kernels for {len(KERNELS)} ops" in (ROOT / "README.md").read_text()


def test_the_cli_page_documents_every_cli_option():
    from milsparse.cli import _build_parser

    text = (DOCS / "cli.md").read_text()
    table = text[text.index("## Options") :]
    parser = _build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert f"milsparse {name}" in text
        assert f"## {name}" in text, f"docs/cli.md has no section on {name}"
        for action in command._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}" in table, f"{name} {flag} is not in docs/cli.md's table"
    assert "--debug" in text


def test_the_benchmark_tables_show_the_recorded_results():
    """The tables are rendered from benchmarks/results/*.json (benchmarks/readme_tables.py)."""
    import importlib.util

    path = ROOT / "benchmarks" / "readme_tables.py"
    spec = importlib.util.spec_from_file_location("readme_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (DOCS / "benchmarks.md").read_text()
    assert module.render(text) == text, "run python benchmarks/readme_tables.py"
