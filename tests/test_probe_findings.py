"""Regressions of the faults a probe with bad and unusual inputs found (issue 7, findings 1-19).

Each test reproduces one finding as the probe met it, then checks the fixed behaviour. Tests of
findings that live in one component (masks, the prune pass, verify) sit beside that component's
tests and are named in the docstrings here.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from milsparse.fixtures import programs
from milsparse.fixtures.files import tree_digest

import milsparse as ms
from milsparse import package, staging, targets
from milsparse.cli import main
from milsparse.errors import ConfigError, UnsupportedModelError


@pytest.fixture
def model(save_program):
    return save_program(programs.mlp(sizes=(64, 128, 128, 10)))


def _cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "milsparse.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "milsparse-tmp" in p.name)


# -- 2. the input package is never modified or deleted -----------------------------------------


def test_2_an_output_inside_the_input_is_refused(model, tmp_path, capsys):
    digest = tree_digest(model)
    inside = model / "Data" / "out.mlpackage"
    assert main(["compress", str(model), "-o", str(inside), "--prune", "2:4"]) == 2
    assert "inside the input" in capsys.readouterr().err
    assert not inside.exists() and tree_digest(model) == digest


def test_2_an_output_folder_holding_the_input_is_refused_even_with_force(
    save_program, tmp_path, capsys
):
    box = tmp_path / "box.mlpackage"
    box.mkdir()
    (box / "Manifest.json").write_text("{}")  # looks like a package, so --force would replace it
    inner = box / "model.mlpackage"
    ms.save(ms.compress(save_program(programs.mlp()), "2:4"), inner)
    digest = tree_digest(inner)
    assert main(["compress", str(inner), "-o", str(box), "--prune", "2:4", "--force"]) == 2
    assert "holds the input" in capsys.readouterr().err
    assert tree_digest(inner) == digest


def test_2_an_mlmodel_saved_onto_its_own_package_is_refused(model):
    digest = tree_digest(model)
    loaded = ct.models.MLModel(str(model), skip_model_load=True)
    with pytest.raises(ConfigError, match="output is the input"):
        ms.compress(loaded, "2:4", output=model, overwrite=True)
    with pytest.raises(ConfigError, match="output is the input"):
        ms.save(loaded, model, overwrite=True)
    assert tree_digest(model) == digest


def test_2_an_existing_output_that_is_not_a_package_is_never_replaced(model, tmp_path, capsys):
    folder = tmp_path / "notes.mlpackage"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    assert main(["compress", str(model), "-o", str(folder), "--prune", "2:4", "--force"]) == 2
    assert "is not an .mlpackage" in capsys.readouterr().err
    assert (folder / "keep.txt").read_text() == "mine"


# -- 5. inspect --json on palettized models --------------------------------------------------


def test_5_inspect_json_of_a_palettized_model_holds_null_not_nan(save_program, capsys):
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 16, (64, 64)).astype(types.np_uint4_dtype)
    lut = rng.standard_normal((1, 1, 16, 1)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64), dtype=types.fp16)],
                opset_version=ct.target.iOS18)  # fmt: skip
    def prog(x):
        w = mb.constexpr_lut_to_dense(indices=indices, lut=lut, name="w")
        return mb.linear(x=x, weight=w, name="y")

    path = save_program(prog)
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    row = {r["name"]: r for r in data["weights"]}["w"]
    assert row["format"] == "lut4" and row["form"] == "palettized" and row["sparsity"] is None


# -- 6. a bare model.mlmodel path ----------------------------------------------------------------


def test_6_a_bare_model_file_is_refused_wherever_it_is_run_from(
    model, save_program, tmp_path, capsys, monkeypatch
):
    other = save_program(programs.mlp(sizes=(64, 128, 128, 10), seed=5), "other.mlpackage")
    spec_file = tmp_path / "model.mlmodel"
    spec_file.write_bytes((model / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    weights_of_other = other / "Data" / "com.apple.CoreML"  # a weights/weight.bin lies here
    for cwd in (weights_of_other, tmp_path):
        monkeypatch.chdir(cwd)
        args = ["compress", str(spec_file), "-o", str(tmp_path / "o.mlpackage"), "--prune", "2:4"]
        assert main(args) == 2
        assert "give the .mlpackage folder" in capsys.readouterr().err
    assert not (tmp_path / "o.mlpackage").exists()


# -- 7. NaN or out-of-range tolerances (also tests/test_verify.py) -------------------------------


@pytest.mark.parametrize(
    "flags", [["--min-snr", "nan"], ["--min-cosine", "nan"], ["--min-cosine", "2"]]
)
def test_7_tolerances_that_switch_checks_off_exit_2(model, tmp_path, capsys, flags):
    out = tmp_path / "out.mlpackage"
    args = ["compress", str(model), "-o", str(out), "--prune", "unstructured:0.9", "--verify"]
    assert main(args + flags) == 2
    assert not out.exists()
    assert main(["verify", str(model), str(model), *flags]) == 2
    assert "min_" in capsys.readouterr().err


# -- 10. problems the user can fix exit 2, before any work ---------------------------------------


def _weight_file(path: Path) -> Path:
    return path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated"])
def test_10_a_damaged_weight_file_exits_2(model, tmp_path, capsys, damage):
    blob = _weight_file(model)
    if damage == "missing":
        blob.unlink()
    elif damage == "empty":
        blob.write_bytes(b"")
    else:
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    for args in (["compress", model, "-o", tmp_path / "o.mlpackage", "--prune", "2:4"],
                 ["inspect", model], ["verify", model, model]):  # fmt: skip
        assert main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "weight" in err, err


def test_10_unwritable_outputs_exit_2_before_any_work(model, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    dangling = tmp_path / "dangling.mlpackage"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = {
        a_file / "o.mlpackage": "is not a folder",
        dangling: "symbolic link",
    }
    for out, message in cases.items():
        assert main(["compress", str(model), "-o", str(out), "--prune", "2:4"]) == 2
        assert message in capsys.readouterr().err

    from milsparse.passes.prune import PruneWeights

    def no_work(*args, **kwargs):
        raise AssertionError("the output was checked only after the work")

    monkeypatch.setattr(PruneWeights, "__call__", no_work)
    real_mkdtemp = tempfile.mkdtemp

    def read_only(*args, **kwargs):
        if kwargs.get("dir") is not None:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_mkdtemp(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(staging.tempfile, "mkdtemp", read_only)
        assert main(["compress", str(model), "-o", str(tmp_path / "o.mlpackage"), "--prune",
                     "2:4"]) == 2  # fmt: skip
        assert "cannot write there: Read-only file system" in capsys.readouterr().err
    with monkeypatch.context() as m:
        m.setattr(staging.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
        assert main(["compress", str(model), "-o", str(tmp_path / "o.mlpackage"), "--prune",
                     "2:4"]) == 2  # fmt: skip
        assert "MiB free, the output (and the scratch values beside it) needs" in (
            capsys.readouterr().err
        )
    assert _leftovers(tmp_path) == []


def test_10_a_disk_that_fills_during_the_write_exits_2_and_leaves_nothing(
    model, tmp_path, capsys, monkeypatch
):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(package, "write_package", full)
    out = tmp_path / "o.mlpackage"
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_10_a_disk_that_fills_while_values_spill_exits_2_and_leaves_nothing(
    model, tmp_path, capsys, monkeypatch
):
    from milsparse.ir import blobs

    def full(self, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blobs.Spill, "put", full)
    out = tmp_path / "o.mlpackage"
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4"]) == 2
    assert "cannot write compressed values: No space left on device" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "--seed must be an integer >= 0"),
        (["--inputs", "x.npy"], "a single array (.npy), not a .npz archive"),
    ],
)
def test_10_bad_verify_inputs_exit_2(model, tmp_path, capsys, args, message):
    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    args = [a.replace("x.npy", str(tmp_path / "x.npy")) for a in args]
    assert main(["verify", str(model), str(model), *args]) == 2
    assert message in capsys.readouterr().err


# -- 12. signals mid-write leave nothing behind; stale temporaries are cleaned --------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("verify", [False, True])
def test_12_sigterm_and_sighup_mid_write_clean_up(
    model, tmp_path, capsys, monkeypatch, signum, verify
):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real = package.make_deterministic

    def killed(package):
        real(package)
        os.kill(os.getpid(), signum)  # arrives while the staged package is complete but unmoved

    monkeypatch.setattr(package, "make_deterministic", killed)
    args = ["compress", str(model), "-o", str(out_dir / "o.mlpackage"), "--prune", "2:4"]
    args += ["--verify", "--min-snr", "0", "--min-cosine", "0"] if verify else []
    assert main(args) == 128 + signum
    assert f"terminated by {signal.Signals(signum).name}" in capsys.readouterr().err
    gc.collect()  # the temporary package of --verify goes with its model
    assert os.listdir(out_dir) == [] and _leftovers(temp) == []
    assert signal.getsignal(signum) is not None  # handlers restored after the run


def test_12_temporaries_of_a_killed_run_are_removed_by_the_next(model, tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = [tmp_path / f".o.mlpackage.milsparse-tmp-{gone}-abc", temp / f"milsparse-tmp-{gone}-x"]
    mine = temp / f"milsparse-tmp-{os.getpid()}-alive"  # a live process's: kept
    other = tmp_path / "unrelated-tmp-dir"
    for folder in (*stale, mine, other):
        folder.mkdir()
        (folder / "model.mlpackage").mkdir()
    args = ["compress", str(model), "-o", str(tmp_path / "o.mlpackage"), "--prune", "2:4"]
    assert main(args + ["--verify", "--min-snr", "0", "--min-cosine", "0"]) == 0
    assert not any(p.exists() for p in stale)
    assert mine.exists() and other.exists()


# -- 16, 17. exit codes and stderr -----------------------------------------------------------


def test_16_debug_keeps_the_exit_code_of_user_errors(model, tmp_path, capsys):
    missing = str(tmp_path / "nope.mlpackage")
    assert main(["--debug", "compress", missing, "-o", str(tmp_path / "o.mlpackage"),
                 "--prune", "2:4"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().endswith("no such file or directory")
    heavy = tmp_path / "heavy.mlpackage"
    ms.compress(model, "unstructured:0.95", output=heavy)
    assert main(["--debug", "verify", str(model), str(heavy)]) == 1


def test_17_stderr_holds_only_milsparse_line_despite_coremltools_import_warnings(tmp_path):
    fake = tmp_path / "site" / "sklearn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "99.0.0"\n')  # coremltools warns on it
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    done = _cli("inspect", tmp_path / "nope.mlpackage", env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"milsparse: error: {tmp_path / 'nope.mlpackage'}: "
                                        "no such file or directory"]  # fmt: skip
    debug = _cli("--debug", "inspect", tmp_path / "nope.mlpackage", env=env)
    assert "scikit-learn version 99.0.0 is not supported" in debug.stderr


# -- 18. misleading or silent flags -----------------------------------------------------------


def test_18_verify_options_without_verify_are_refused(model, tmp_path, capsys):
    out = tmp_path / "o.mlpackage"
    for flags in (["--inputs", str(tmp_path / "missing.npz")], ["--samples", "3"],
                  ["--min-cosine", "0.5"]):  # fmt: skip
        assert main(["compress", str(model), "-o", str(out), "--prune", "2:4", *flags]) == 2
        assert "only apply with --verify" in capsys.readouterr().err
    assert not out.exists()


# -- 19. target names ----------------------------------------------------------------------------


def test_19_target_names_of_every_platform_and_a_clear_refusal():
    assert targets.parse_target("macOS13") is ct.target.iOS16
    assert targets.parse_target("MACOS15") is ct.target.iOS18
    assert targets.parse_target("watchOS10") is ct.target.iOS17
    assert targets.parse_target(ct.target.tvOS18) is ct.target.iOS18
    # every target coremltools 9 offers (issue 16): iOS26 is specification 10
    assert targets.parse_target("ios26") is targets.parse_target("macOS26") is ct.target.iOS26
    assert targets.parse_target(ct.target.watchOS26) is ct.target.iOS26
    for bad in ("ios27", "macOS12", "ios15", ct.target.iOS15, 18):
        with pytest.raises(ConfigError) as info:
            targets.parse_target(bad)
        offered = str(info.value).split("use one of")[1]
        assert offered.startswith(" ios16, ios17, ios18, ios26 (")


def test_19_the_cli_takes_the_same_target_names(model, tmp_path, capsys):
    out = tmp_path / "o.mlpackage"
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4", "--target",
                 "macOS15", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["target"] == "iOS18"
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4", "--force",
                 "--target", "ios26", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["target"] == "iOS26"
    written = ct.models.MLModel(str(out), skip_model_load=True)
    assert written.get_spec().specificationVersion == 10
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4", "--force",
                 "--target", "ios27"]) == 2  # fmt: skip
    assert "unsupported target" in capsys.readouterr().err


def test_unreadable_models_are_unsupported_model_errors(tmp_path):
    with pytest.raises(UnsupportedModelError):
        ms.inspect_model(tmp_path)


# -- 8. config validation holes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, message",
    [
        ({"spec": {"pattern": "magnitude", "sparsity": True}}, "sparsity must be a number"),
        ("spec:\n  pattern: magnitude\n  sparsity: true\n", "sparsity must be a number"),
        ({"spec": "2:4", "op_types": 5}, "list of names"),
        ({"spec": {"pattern": "magnitude", "sparsity": 0.5, "n": 2}}, "n do not apply"),
        ({"spec": {"pattern": "n:m", "n": 2, "m": 4, "scope": "channel"}}, "scope do not apply"),
        ({"spec": "2:4", "op_types": ["LINEAR"]}, "did you mean 'linear'"),
        ({"spec": "2:4", "op_types": "linear,foo"}, "unknown op types 'foo'"),
        ({"spec": {"pattern": "threshold", "threshold": float("nan")}}, "finite number"),
    ],
)
def test_8_config_values_that_meant_something_else_are_refused(config, message):
    from milsparse.passes.prune_config import parse_prune_config

    with pytest.raises(ConfigError, match=message):
        parse_prune_config(config)


def test_8_cli_op_types_and_unmatched_overrides(model, tmp_path, capsys):
    out = tmp_path / "o.mlpackage"
    for bad in ("foo", "LINEAR"):
        assert main(["compress", str(model), "-o", str(out), "--prune", "2:4",
                     "--op-types", bad]) == 2  # fmt: skip
        assert "unknown op types" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "prune:\n  spec: '2:4'\n  overrides:\n    'fc1*': dense\n    'dense_*': dense\n"
    )
    assert main(["compress", str(model), "-o", str(out), "--recipe", str(recipe), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert notes == ["override 'dense_*' matched no weight or op of this model"]


# -- 9. specs are recorded exactly ----------------------------------------------------------------


def test_9_a_spec_with_more_than_six_digits_verifies_on_a_large_weight(save_program, tmp_path):
    """0.1234556 rounded to 6 digits is 0.123456: on 1.2M blocks, one block more than done."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((1200, 1000)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 1000), dtype=types.fp16)],
                opset_version=ct.target.iOS18)  # fmt: skip
    def prog(x):
        return mb.linear(x=x, weight=mb.const(val=weight, name="w"), name="y")

    path = save_program(prog)
    out = tmp_path / "o.mlpackage"
    assert main(["compress", str(path), "-o", str(out), "--prune", "block1:0.1234556",
                 "--verify", "--min-snr", "0", "--min-cosine", "0"]) == 0  # fmt: skip
    report = ms.verify(path, out, samples=1)
    (check,) = report.weights
    assert check.pattern == "block1:0.1234556" and check.pattern_holds, check.detail


def test_9_spec_strings_read_back_as_the_same_spec():
    from hypothesis import given
    from hypothesis import strategies as st
    from milsparse.passes.prune_config import PruneSpec, parse_prune_spec

    fractions = st.floats(0, 1, allow_nan=False)
    specs = st.one_of(
        st.builds(lambda s, c: PruneSpec("magnitude", sparsity=s, scope=c), fractions,
                  st.sampled_from(["tensor", "channel"])),
        st.builds(lambda t: PruneSpec("threshold", threshold=t), st.floats(0, 1e30)),
        st.builds(lambda s, b, a: PruneSpec("block", sparsity=s, block_size=b, axis=a),
                  fractions, st.integers(1, 64), st.sampled_from([None, "input", "output"])),
    )  # fmt: skip

    @given(specs)
    def round_trip(spec):
        assert parse_prune_spec(spec.to_string()) == spec

    round_trip()


# -- 1. retargeting a compressed model -----------------------------------------------------------


def _ios16_compressed(save_program, opset=ct.target.iOS17):
    """Every iOS16/17 constexpr form, as milsparse and coremltools write them: a packed-mask
    sparse weight, a palettized one, an affine-quantized one and an fp16 constexpr_cast."""
    from milsparse.ir import formats

    rng = np.random.default_rng(0)
    w_sparse = rng.standard_normal((32, 64)).astype(np.float16)
    keep = rng.random((32, 64)) > 0.5
    enc = formats.encode_sparse_ios16(w_sparse, keep)
    lut = np.sort(rng.standard_normal(16)).astype(np.float16)
    packed = np.packbits(
        np.unpackbits(rng.integers(0, 16, 32 * 32).astype(np.uint8)[:, None], axis=1,
                      bitorder="little")[:, :4].ravel(), bitorder="little")  # fmt: skip
    quantized = rng.integers(-128, 128, (32, 32)).astype(np.int8)
    cast_source = rng.standard_normal((32, 32)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64), dtype=types.fp16)],
                opset_version=opset)  # fmt: skip
    def prog(x):
        w1 = mb.constexpr_sparse_to_dense(nonzero_data=enc.nonzero_data, mask=enc.mask,
                                          shape=enc.shape, name="sparse_w")  # fmt: skip
        shape = np.array([32, 32], np.uint32)
        w2 = mb.constexpr_lut_to_dense(lut=lut, indices=packed, shape=shape, name="lut_w")
        w3 = mb.constexpr_affine_dequantize(
            quantized_data=quantized, zero_point=np.int8(3), scale=np.float16(0.01), axis=0,
            name="quant_w",
        )  # fmt: skip
        w4 = mb.constexpr_cast(source_val=cast_source, output_dtype="fp32", name="cast_w")
        h = mb.linear(x=x, weight=w1, name="h")
        h = mb.linear(x=h, weight=w2, name="h2")
        h = mb.linear(x=h, weight=w3, name="h3")
        return mb.linear(x=mb.cast(x=h, dtype="fp32"), weight=w4, name="y")

    return save_program(prog)


def test_1_retargeting_compressed_weights_writes_a_loadable_ios18_package(
    save_program, tmp_path, capsys
):
    source = _ios16_compressed(save_program)
    out = tmp_path / "o.mlpackage"
    assert main(["compress", str(source), "-o", str(out), "--prune", "2:4", "--target",
                 "ios18"]) == 0  # fmt: skip
    capsys.readouterr()
    ct.models.MLModel(str(out), skip_model_load=True)  # coremltools loads it
    prog = ms.load_program(out)
    ops = {op.name: op for op in prog.functions["main"].operations}
    assert "shape" not in ops["sparse_w"].inputs and ops["sparse_w"].mask.shape == (32, 64)
    assert "shape" not in ops["lut_w"].inputs and ops["lut_w"].lut.shape == (1, 1, 16, 1)
    assert ops["quant_w"].op_type == "constexpr_affine_dequantize"
    assert main(["inspect", str(out)]) == 0
    assert main(["verify", str(source), str(out), "--min-snr", "100"]) == 0
    report = ms.verify(source, out)
    assert all(o.max_abs == 0 and o.cosine == 1.0 for o in report.outputs)
    # the weights decode to exactly what they were, op by op
    before = {op.name: op for op in ms.load_program(source).functions["main"].operations}
    for name in ("sparse_w", "lut_w", "cast_w"):
        from milsparse.ir.interpreter import static_values

        (old,) = static_values(before[name])
        (new,) = static_values(ops[name])
        np.testing.assert_array_equal(old, new)


# -- 4. multifunction packages -------------------------------------------------------------------


@pytest.mark.parametrize("functions", [("main", "other"), ("prefill", "decode")])
def test_4_multifunction_packages_compress_verify_and_share_weights(tmp_path, capsys, functions):
    source = programs.multifunction_package(tmp_path / "multi.mlpackage", functions)
    single = tmp_path / "single.mlpackage"
    programs.program_to_mlmodel(programs.mlp(sizes=(64, 128, 128, 10))).save(str(single))
    out, single_out = tmp_path / "o.mlpackage", tmp_path / "single_o.mlpackage"
    assert main(["compress", str(source), "-o", str(out), "--prune", "2:4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert main(["compress", str(single), "-o", str(single_out), "--prune", "2:4", "--json"]) == 0
    single_report = json.loads(capsys.readouterr().out)
    # every weight is pruned once, stored once, counted once
    assert report["totals"] == single_report["totals"]
    rows = report["weights"]
    assert {r["function"] for r in rows} == set(functions)
    assert [r["shared_with"] for r in rows if r["function"] == functions[1]] == [functions[0]] * 6
    size = _weight_file(out).stat().st_size
    assert size == _weight_file(single_out).stat().st_size
    assert main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["totals"]["stored_bytes"] == single_report["totals"]["stored_bytes"]
    assert all(r["read_by"] == list(functions) for r in inspected["weights"])  # who reads it
    assert main(["inspect", str(out)]) == 0
    assert ",".join(functions) in capsys.readouterr().out
    # the default function is verified, from its own input description
    assert main(["verify", str(source), str(out), "--min-snr", "0", "--min-cosine", "0"]) == 0
    assert "PASS" in capsys.readouterr().out
    # and any other function on request, its pattern checks included
    assert main(["verify", str(source), str(out), "--function", functions[1], "--min-snr", "0",
                 "--min-cosine", "0", "--json"]) == 0  # fmt: skip
    checked = json.loads(capsys.readouterr().out)
    assert checked["passed"] and len(checked["weights"]) == 2  # the last layer is too small
    assert all(w["pattern_holds"] for w in checked["weights"])
    assert main(["verify", str(source), str(out), "--function", "nope"]) == 2
    assert "the reference has no function 'nope'" in capsys.readouterr().err
    prog = ms.load_program(out)
    assert list(prog.functions) == list(functions)
    assert ms.verify(source, source).passed


def test_4_multifunction_output_bytes_do_not_depend_on_the_hash_seed(tmp_path):
    functions = ("prefill", "decode", "b", "zeta", "alpha")  # weights of their own: seeds 0-4
    source = programs.multifunction_package(tmp_path / "m.mlpackage", functions, seeds=range(5))
    digests = []
    for seed in ("0", "1", "3"):  # three seeds that list the functions in other orders
        out = tmp_path / f"o{seed}.mlpackage"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = _cli("compress", source, "-o", out, "--prune", "unstructured:0.5", env=env)
        assert done.returncode == 0, done.stderr
        digests.append(tree_digest(out))
    assert digests[0] == digests[1] == digests[2]


def test_an_interrupt_after_the_output_is_in_place_says_it_is_complete(
    save_program, tmp_path, monkeypatch, capsys
):
    """Minor finding: an interrupt after the final rename reported only "interrupted" (130),
    so a complete output looked lost. It still exits 130, and says the output is complete;
    an interrupt before the move says nothing was written."""
    from milsparse import report as report_module

    model = save_program(programs.mlp(sizes=(64, 128, 10), dtype=np.float16))
    out = tmp_path / "out.mlpackage"
    args = ["compress", str(model), "-o", str(out), "--prune", "2:4", "--min-size", "16"]
    capsys.readouterr()

    def interrupt(*_):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("milsparse.api.run_compress", interrupt)
        assert main(args) == 130
    assert capsys.readouterr().err.strip() == "milsparse: interrupted" and not out.exists()
    with monkeypatch.context() as m:  # the report is printed after the move
        m.setattr(report_module.CompressReport, "__str__", interrupt)
        assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"milsparse: interrupted after {out} was written (it is complete)"
    assert ms.inspect_model(out).totals()["weights"] == 4
