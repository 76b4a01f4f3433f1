"""The README's lists that mirror code stay true to it."""

import re
from pathlib import Path

from milsparse.ir.interpreter import KERNELS, _load_kernels

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_lists_exactly_the_interpreter_ops():
    _load_kernels()
    text = README.read_text()
    block = re.search(r"<!-- ops -->(.*?)<!-- /ops -->", text, re.S).group(1)
    listed = re.findall(r"`([a-z0-9_]+)`", block)
    assert listed == sorted(KERNELS)
    assert f"Ops with a kernel ({len(KERNELS)})" in text


def test_readme_documents_every_cli_option():
    from milsparse.cli import _build_parser

    text = README.read_text()
    parser = _build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert f"milsparse {name}" in text
        for action in command._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"{flag}" in text, f"{name} {flag} is not in the README"


def test_readme_benchmark_tables_show_the_recorded_results():
    """The tables are rendered from benchmarks/results/*.json (benchmarks/readme_tables.py)."""
    import importlib.util

    path = README.parent / "benchmarks" / "readme_tables.py"
    spec = importlib.util.spec_from_file_location("readme_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = README.read_text()
    assert module.render(text) == text, "run python benchmarks/readme_tables.py"
