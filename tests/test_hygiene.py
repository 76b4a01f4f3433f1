"""milsparse is safe to embed (issue 15): no call leaves a coremltools module global or a logger
level changed, and coremltools' import notes stay off stderr."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from milsparse.fixtures import programs

import milsparse as ms
from milsparse.cli import main

# coremltools itself rebinds these on every conversion (`_reset_conversion_state`).
_REBOUND_BY_COREMLTOOLS = {"coremltools.converters.mil.mil.block.BLOCK_STACK"}


def _coremltools_state() -> dict:
    """Every coremltools module's globals (by identity) and every coremltools logger's level."""
    state = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "coremltools" and module is not None:
            state[name] = {k: id(v) for k, v in vars(module).items()}
    loggers = logging.Logger.manager.loggerDict
    for name in list(loggers):
        if name.split(".")[0] == "coremltools" and isinstance(loggers[name], logging.Logger):
            state[f"logger {name}"] = (loggers[name].level, tuple(loggers[name].filters))
    return state


def _changes(before: dict, after: dict) -> list[str]:
    changed = []
    for name, values in before.items():
        now = after.get(name)
        if isinstance(values, dict):
            changed += [f"{name}.{k}" for k, v in values.items() if now.get(k) != v]
            changed = [c for c in changed if c not in _REBOUND_BY_COREMLTOOLS]
        elif now != values:
            changed.append(name)
    return changed


def test_compress_verify_and_the_cli_leave_coremltools_as_they_found_it(save_program, tmp_path):
    model = save_program(programs.mlp(sizes=(64, 128, 128, 10), dtype=np.float16))
    args = ["compress", str(model), "-o", str(tmp_path / "warm.mlpackage"), "--prune", "2:4"]
    assert main(args) == 0  # first use: coremltools fills its own caches
    before = _coremltools_state()
    small = ms.compress(model, ["2:4", "lut4"])
    ms.verify(model, small)
    ms.save(small, tmp_path / "a.mlpackage")
    args = ["compress", str(model), "-o", str(tmp_path / "b.mlpackage"), "--prune", "2:4"]
    assert main(args) == 0
    assert main(["verify", str(model), str(tmp_path / "b.mlpackage")]) in (0, 1)
    assert main(["inspect", str(tmp_path / "b.mlpackage")]) == 0
    assert _changes(before, _coremltools_state()) == []


def test_coremltools_imported_after_milsparse_has_its_passes_and_is_quiet():
    code = (
        "import milsparse, coremltools\n"
        "from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY\n"
        "print('milsparse::prune' in PASS_REGISTRY, len(milsparse.IMPORT_NOTES) > 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["True", "True"], run.stderr
    assert "Failed to load" not in run.stderr and "has not been tested" not in run.stderr


_STARTUP = """
import sys
from milsparse.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("coremltools", "torch", "numpy", "networkx") if m in sys.modules)
print("IMPORTED", ",".join(heavy) or "-", "EXIT", code)
"""


def _startup(*args: str) -> tuple[str, str]:
    run = subprocess.run(
        [sys.executable, "-c", _STARTUP, *args], capture_output=True, text=True, timeout=120
    )
    imported, code = run.stdout.split("IMPORTED ")[-1].split(" EXIT ")
    return imported, code.strip()


def test_help_and_argument_errors_import_neither_coremltools_nor_torch():
    """`milsparse --help` took 5.5-7 s: coremltools imports torch. Neither is needed to print
    help or refuse a flag."""
    assert _startup("--help") == ("-", "0")
    assert _startup("compress", "--help") == ("-", "0")
    assert _startup("compress", "in.mlpackage") == ("-", "2")  # -o missing
    assert _startup("verify") == ("-", "2")
    assert _startup("frobnicate") == ("-", "2")
    assert _startup("passes") == ("-", "0")
    assert _startup("passes", "--json") == ("-", "0")


def test_the_pass_list_without_coremltools_is_the_registry_s():
    """`milsparse passes` reads the declarations (catalog) without importing coremltools; the
    registry holds the same passes once they register."""
    from milsparse.passes.catalog import OWN_PASSES, target_name
    from milsparse.passes.registry import pass_class, pass_spec

    for name, declared in OWN_PASSES.items():
        registered = pass_spec(name)
        assert registered.after == declared.after and registered.summary == declared.summary
        assert target_name(registered.min_target) == declared.min_target
        assert [(c, p, target_name(t)) for c, p, t in registered.transforms] == [
            tuple(t) for t in declared.transforms
        ]
        assert pass_class(name).__module__ == f"milsparse.passes.{name.split('::')[1]}"


def test_import_milsparse_is_light_and_names_load_on_use():
    code = (
        "import sys, milsparse as ms\n"
        "light = 'coremltools' not in sys.modules and 'torch' not in sys.modules\n"
        "names = [n for n in ms.__all__ if getattr(ms, n, None) is None]\n"
        "print(light, names, callable(ms.verify), ms.Tolerances.__module__)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["True", "[]", "True", "milsparse.metrics"], run.stderr


def test_any_module_imported_first_registers_the_passes():
    """A milsparse module whose own `import coremltools` is the first one is part-way through
    its import: registering then failed on its undefined names (`import milsparse.ir.chain`
    raised ImportError). The passes register once the last milsparse module has imported."""
    code = (
        "import importlib, sys\n"
        "importlib.import_module(sys.argv[1])\n"
        "from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY\n"
        "print(all(f'milsparse::{p}' in PASS_REGISTRY for p in ('prune', 'palettize', "
        "'quantize')))\n"
    )
    for module in ("milsparse.ir.chain", "milsparse.ir.interpreter", "milsparse.api",
                   "milsparse.passes.registry", "milsparse.cli"):  # fmt: skip
        run = subprocess.run(
            [sys.executable, "-c", code, module], capture_output=True, text=True, timeout=120
        )
        assert run.stdout.split() == ["True"], (module, run.stderr)
        assert run.returncode == 0, (module, run.stderr)


def test_the_library_is_quiet_off_a_terminal_unless_progress_is_asked(
    save_program, tmp_path, capfd
):
    """Issue 15: each ms.compress printed coremltools' progress bars. Off a terminal (stderr
    is a pipe here) nothing is printed unless `progress=True`, which shows milsparse's bars for
    loading, each step and writing (coremltools' own bars, about none of milsparse's work,
    stay hidden); `progress=False` is silent everywhere."""
    model = save_program(programs.mlp(sizes=(64, 128, 128, 10), dtype=np.float16))
    capfd.readouterr()
    for progress in (None, False):
        ms.compress(model, ["2:4", "lut4"], progress=progress)
        assert capfd.readouterr().err == ""
    ms.compress(model, ["2:4", "lut4"], output=tmp_path / "o.mlpackage", progress=True)
    err = capfd.readouterr().err
    for bar in ("loading model.mlpackage", "milsparse::prune", "milsparse::palettize",
                "writing o.mlpackage"):  # fmt: skip
        assert bar in err
    assert "Running MIL" not in err
    with pytest.raises(ms.ConfigError, match="progress must be True, False or None"):
        ms.compress(model, "2:4", progress="yes")
