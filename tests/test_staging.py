"""Writing outputs: nothing at the output is lost to a race, a kill or a long name (issue 15,
findings 1, 2 and 13), and packages are read only from inside themselves (findings 3, 4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from milsparse.fixtures import programs
from milsparse.fixtures.files import tree_digest

from milsparse import package, staging
from milsparse.cli import main


@pytest.fixture
def model(save_program):
    return save_program(programs.mlp(sizes=(64, 128, 128, 10)))


@pytest.fixture(params=["flagged rename", "plain rename"])
def renames(request, monkeypatch):
    """Both ways of moving into place: renameat2/renamex_np, and the fallback without them."""
    if request.param == "plain rename":
        monkeypatch.setattr(staging, "_rename_flagged", lambda src, dst, how: False)
    return request.param


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if staging.TEMP_TAG in p.name)


def _write_during_the_write(monkeypatch, what):
    """Run `what()` once the staged package is complete, just before it moves into place."""
    real = package.make_deterministic

    def finish(staged):
        real(staged)
        what()

    monkeypatch.setattr(package, "make_deterministic", finish)


# -- 1. an output that appears during the write ------------------------------------------------


def test_1_an_output_that_appears_during_the_write_is_kept(
    model, tmp_path, capsys, monkeypatch, renames
):
    out = tmp_path / "out.mlpackage"
    _write_during_the_write(monkeypatch, lambda: shutil.copytree(model, out))
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4"]) == 2
    assert "appeared while milsparse was writing" in capsys.readouterr().err
    assert tree_digest(out) == tree_digest(model)  # the other writer's package, untouched
    assert _leftovers(tmp_path) == []


def test_1_with_force_an_output_that_appeared_is_replaced_by_a_complete_one(
    model, tmp_path, monkeypatch, renames
):
    out = tmp_path / "out.mlpackage"
    _write_during_the_write(monkeypatch, lambda: shutil.copytree(model, out))
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4", "--force"]) == 0
    assert tree_digest(out) != tree_digest(model)
    assert package.load_program(package.open_model(out)) is not None
    assert _leftovers(tmp_path) == []


def test_1_force_replaces_an_existing_package_and_leaves_nothing(model, tmp_path, renames):
    out = tmp_path / "out.mlpackage"
    shutil.copytree(model, out)
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4", "--force"]) == 0
    assert tree_digest(out) != tree_digest(model) and _leftovers(tmp_path) == []


# -- 2. a kill between moving the old package aside and the new one into place ----------------

_KILLED_MID_SWAP = """
import os, signal, sys
from milsparse import staging
from milsparse.cli import main

staging._rename_flagged = lambda src, dst, how: False  # the fallback: no atomic exchange
real_move = staging._move_new

def move_then_die(src, dst):
    if not os.path.exists(dst):  # the old package is aside; the new one is not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    return real_move(src, dst)

staging._move_new = move_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_2_a_kill_mid_replacement_never_loses_the_old_package(model, tmp_path):
    out = tmp_path / "out.mlpackage"
    shutil.copytree(model, out)
    before = tree_digest(out)
    args = ["compress", str(model), "-o", str(out), "--prune", "2:4", "--force"]
    run = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_SWAP, *args], capture_output=True, timeout=300
    )
    assert run.returncode == -9, run.stderr.decode()
    assert not out.exists()  # the moment the fault met: nothing at the output
    assert any(name.startswith(".milsparse-tmp-") for name in _leftovers(tmp_path))
    # The next run (here its first step) puts the old package back instead of deleting it.
    staging.remove_stale_temporaries(tmp_path)
    assert tree_digest(out) == before
    assert _leftovers(tmp_path) == []


def test_2_a_next_compress_restores_the_old_package_first(model, tmp_path):
    out = tmp_path / "out.mlpackage"
    shutil.copytree(model, out)
    before = tree_digest(out)
    args = ["compress", str(model), "-o", str(out), "--prune", "2:4", "--force"]
    subprocess.run([sys.executable, "-c", _KILLED_MID_SWAP, *args], timeout=300)
    other = tmp_path / "other.mlpackage"
    assert main(["compress", str(model), "-o", str(other), "--prune", "2:4"]) == 0
    assert tree_digest(out) == before


def test_2_a_stale_folder_whose_package_was_replaced_is_removed(tmp_path):
    """The old package aside and a new one at its place: the new one stays, the old goes."""
    stale = tmp_path / f".{staging.TEMP_TAG}999999999-x"
    (stale / "previous").mkdir(parents=True)
    (stale / "restore-to").write_text("out.mlpackage")
    (tmp_path / "out.mlpackage").mkdir()
    (tmp_path / "out.mlpackage" / "new").write_text("new")
    assert staging.remove_stale_temporaries(tmp_path) == [stale]
    assert (tmp_path / "out.mlpackage" / "new").is_file()


# -- 3, 4. a package reads only what lies inside it ---------------------------------------------


def _manifest(pkg: Path) -> dict:
    return json.loads((pkg / "Manifest.json").read_text())


def _weights_item(manifest: dict) -> str:
    return next(k for k, v in manifest["itemInfoEntries"].items() if v["name"] == "weights")


def test_3_a_manifest_without_weights_never_reads_the_current_folder(model, save_program, tmp_path):
    other = save_program(programs.mlp(sizes=(64, 128, 128, 10), seed=7), name="other.mlpackage")
    manifest = _manifest(model)
    del manifest["itemInfoEntries"][_weights_item(manifest)]
    (model / "Manifest.json").write_text(json.dumps(manifest))
    cwd = tmp_path / "cwd"
    (cwd / "weights").mkdir(parents=True)
    weights = other / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    for where in (cwd / "weight.bin", cwd / "weights" / "weight.bin"):
        shutil.copy(weights, where)
    out = tmp_path / "out.mlpackage"
    run = subprocess.run(
        [sys.executable, "-m", "milsparse.cli", "compress", str(model), "-o", str(out)]
        + ["--prune", "2:4"],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "the package has no weights item" in run.stderr
    assert not out.exists()


def test_4_a_manifest_path_leaving_the_package_is_refused(model, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(model / "Data" / "com.apple.CoreML" / "weights", elsewhere / "weights")
    manifest = _manifest(model)
    manifest["itemInfoEntries"][_weights_item(manifest)]["path"] = "../../elsewhere/weights"
    (model / "Manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out.mlpackage"
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4"]) == 2
    assert "lies outside the package" in capsys.readouterr().err
    assert not out.exists()


def test_4_a_weights_folder_linked_outside_the_package_is_refused(model, tmp_path, capsys):
    weights = model / "Data" / "com.apple.CoreML" / "weights"
    elsewhere = tmp_path / "elsewhere"
    shutil.move(weights, elsewhere)
    os.symlink(elsewhere, weights)
    assert main(["inspect", str(model)]) == 2
    assert "outside the package" in capsys.readouterr().err


def test_4_a_weight_file_linked_outside_the_package_is_refused(model, tmp_path, capsys):
    blob = model / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    shutil.move(blob, tmp_path / "weight.bin")
    os.symlink(tmp_path / "weight.bin", blob)
    assert main(["inspect", str(model)]) == 2
    assert "lies outside the package" in capsys.readouterr().err


# -- 13. long names ------------------------------------------------------------------------------


def test_13_a_legal_long_output_name_is_written(model, tmp_path):
    name = "m" * (250 - len(".mlpackage")) + ".mlpackage"
    out = tmp_path / name
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4"]) == 0
    assert (out / "Manifest.json").is_file()


def test_13_an_over_long_output_name_or_path_exits_2(model, tmp_path, capsys):
    name = "m" * 300 + ".mlpackage"
    assert main(["compress", str(model), "-o", str(tmp_path / name), "--prune", "2:4"]) == 2
    assert "output name is 310 bytes" in capsys.readouterr().err
    deep = tmp_path.joinpath(*["d" * 200] * 21)
    assert main(["compress", str(model), "-o", str(deep / "o.mlpackage"), "--prune", "2:4"]) == 2
    assert "Choose a shorter path" in capsys.readouterr().err
