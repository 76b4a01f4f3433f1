import json
import subprocess
import sys

import numpy as np
import pytest
from milsparse.fixtures import programs
from milsparse.fixtures.files import tree_digest

from milsparse.cli import main


@pytest.fixture
def model(save_program):
    return save_program(programs.mlp(sizes=(64, 128, 128, 10)))


def test_compress_then_inspect_json(model, tmp_path, capsys):
    out = tmp_path / "out.mlpackage"
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output"] == str(out)
    assert [w["name"] for w in report["weights"] if w["compressed"]] == ["fc0_weight", "fc1_weight"]
    assert report["totals"]["bytes_saved"] > 0
    assert main(["inspect", str(out), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    formats = {w["name"]: (w["format"], w["sparsity"]) for w in table["weights"]}
    assert formats["fc0_weight"] == ("sparse", 0.5)
    assert formats["fc2_weight"] == ("dense", 0.0)
    assert table["totals"]["stored_bytes"] == sum(w["stored_bytes"] for w in table["weights"])
    assert set(table["weights"][0]) >= {
        "name",
        "consumers",
        "shape",
        "dtype",
        "format",
        "sparsity",
        "stored_bytes",
        "bits_per_weight",
    }


def test_compress_text_report_and_flags(model, tmp_path, capsys):
    out = tmp_path / "out.mlpackage"
    args = [
        "compress",
        str(model),
        "-o",
        str(out),
        "--prune",
        "block4@1:0.5",
        "--op-types",
        "linear",
        "--min-size",
        "64",
        "--target",
        "ios18",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "block4@in:0.5" in text and f"wrote {out}" in text
    assert "fc2_weight" in text and "3 of" in text


def test_threshold_with_min_sparsity(model, tmp_path, capsys):
    out = tmp_path / "out.mlpackage"
    assert (
        main(
            [
                "compress",
                str(model),
                "-o",
                str(out),
                "--prune",
                "threshold:1e-9",
                "--min-sparsity",
                "0.3",
                "--json",
            ]
        )
        == 0
    )
    reasons = {w["name"]: w["reason"] for w in json.loads(capsys.readouterr().out)["weights"]}
    assert reasons["fc0_weight"].startswith("below minimum sparsity")


def test_recipe_file(model, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prune:\n  spec: '1:2'\n  overrides: {fc1_weight: dense}\n")
    out = tmp_path / "out.mlpackage"
    assert main(["compress", str(model), "-o", str(out), "--recipe", str(recipe), "--json"]) == 0
    weights = {w["name"]: w for w in json.loads(capsys.readouterr().out)["weights"]}
    assert weights["fc0_weight"]["spec"] == "1:2"
    assert not weights["fc1_weight"]["compressed"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prune", "2:5x"], "bad prune spec '2:5x'"),
        (["--prune", "5:4"], "n:m needs integers 0 <= n <= m"),
        (["--prune", "unstructured:1.5"], "sparsity must be a number in [0, 1]"),
        (["--prune", "2:4@2"], "bad axis '2'"),
        (["--prune", "2:4", "--min-size", "-1"], "min_size must be an integer >= 0"),
        (["--prune", "2:4", "--min-sparsity", "0.5"], "--min-sparsity applies to threshold"),
    ],
)
def test_bad_flag_values_are_one_line_errors(model, tmp_path, capsys, args, message):
    out = tmp_path / "out.mlpackage"
    assert main(["compress", str(model), "-o", str(out)] + args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_existing_output_needs_force_and_input_is_never_the_output(model, tmp_path, capsys):
    out = tmp_path / "out.mlpackage"
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4"]) == 0
    digest = tree_digest(out)
    assert main(["compress", str(model), "-o", str(out), "--prune", "unstructured:0.9"]) == 2
    assert "allow overwriting (--force)" in capsys.readouterr().err
    assert tree_digest(out) == digest
    assert (
        main(["compress", str(model), "-o", str(out), "--prune", "unstructured:0.9", "--force"])
        == 0
    )
    assert tree_digest(out) != digest
    assert main(["compress", str(model), "-o", str(model), "--prune", "2:4", "--force"]) == 2
    assert "never modifies its input" in capsys.readouterr().err


def test_passes_lists_the_registry(capsys):
    assert main(["passes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    prune = next(r for r in rows if r["name"] == "milsparse::prune")
    assert "common::add_fp16_cast" in prune["after"] and prune["min_target"] == "iOS16"


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "milsparse.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_bad_paths_and_non_mlprogram_models_exit_2_with_one_line(tmp_path):
    missing = _run_cli(
        "compress",
        str(tmp_path / "nope.mlpackage"),
        "-o",
        str(tmp_path / "o.mlpackage"),
        "--prune",
        "2:4",
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"milsparse: error: {tmp_path / 'nope.mlpackage'}: no such file or directory"
    ]
    not_model = tmp_path / "junk.mlpackage"
    not_model.mkdir()
    bad = _run_cli("inspect", str(not_model))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "not an .mlpackage" in bad.stderr
    usage = _run_cli("compress", "x.mlpackage")
    assert usage.returncode == 2 and "required" in usage.stderr and "Traceback" not in usage.stderr


def test_verify_exit_codes_and_reports(model, tmp_path, capsys):
    light, heavy = tmp_path / "light.mlpackage", tmp_path / "heavy.mlpackage"
    assert main(["compress", str(model), "-o", str(light), "--prune", "unstructured:0.2"]) == 0
    assert main(["compress", str(model), "-o", str(heavy), "--prune", "unstructured:0.9"]) == 0
    capsys.readouterr()
    assert main(["verify", str(model), str(light), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["samples"] == 4
    assert [o["name"] for o in report["outputs"]] == ["fc2"]
    assert main(["verify", str(model), str(heavy), "--samples", "2"]) == 1
    text = capsys.readouterr().out
    assert "FAIL: output fc2: SNR" in text and "(2 input samples)" in text
    assert main(["verify", str(model), str(heavy), "--min-snr", "-100", "--min-cosine", "0"]) == 0
    capsys.readouterr()


def test_verify_bad_inputs_exit_2(model, tmp_path, capsys):
    import numpy as np

    cases = {
        "missing.npz": "no such file",
        "wrong_name.npz": "missing input 'x'",
        "wrong_shape.npz": "has shape (3, 64)",
    }
    np.savez(tmp_path / "wrong_name.npz", y=np.zeros((2, 64), np.float32))
    np.savez(tmp_path / "wrong_shape.npz", x=np.zeros((3, 64), np.float32))
    for name, message in cases.items():
        assert main(["verify", str(model), str(model), "--inputs", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["verify", str(model), str(model), "--samples", "0"]) == 2
    assert "--samples must be an integer >= 1" in capsys.readouterr().err
    np.savez(tmp_path / "good.npz", x=np.ones((2, 64), np.float32))
    assert main(["verify", str(model), str(model), "--inputs", str(tmp_path / "good.npz")]) == 0


def test_compress_verify_refuses_to_write_a_failing_model(model, tmp_path, capsys):
    out = tmp_path / "out.mlpackage"
    args = ["compress", str(model), "-o", str(out), "--verify"]
    assert main(args + ["--prune", "unstructured:0.9"]) == 1
    text = capsys.readouterr().out
    assert "verification failed" in text and "not written" in text
    assert not out.exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing half-written
    assert main(args + ["--prune", "unstructured:0.2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output"] == str(out) and report["verify"]["passed"]
    assert out.exists()


def test_internal_errors_exit_3_with_one_line(model, capsys, monkeypatch):
    from milsparse import verification

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(verification, "run_verify", broken)
    assert main(["verify", str(model), str(model)]) == 3
    err = capsys.readouterr().err
    assert err == "milsparse: internal error: RuntimeError: boom (rerun with --debug)\n"


def test_a_clean_run_prints_nothing_on_stderr(model, tmp_path):
    out = tmp_path / "out.mlpackage"
    done = _run_cli("compress", str(model), "-o", str(out), "--prune", "2:4", "--verify",
                    "--min-snr", "0", "--min-cosine", "0")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no coremltools progress bars or import noise
    assert "PASS" in done.stdout and out.exists()


def test_scope_channel_prunes_each_output_channel_and_verify_checks_it(model, tmp_path, capsys):
    out = tmp_path / "out.mlpackage"
    args = ["compress", str(model), "-o", str(out), "--prune", "unstructured:0.3"]
    assert main(args + ["--scope", "channel", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["weights"]}
    assert rows["fc0_weight"]["spec"] == "unstructured@channel:0.3"
    assert rows["fc0_weight"]["axis"] == 0
    assert (
        main(["verify", str(model), str(out), "--json", "--min-snr", "0", "--min-cosine", "0"]) == 0
    )
    checks = {w["name"]: w for w in json.loads(capsys.readouterr().out)["weights"]}
    assert checks["fc0_weight"]["pattern_holds"] is True
    assert "every output channel has 19 zeros" == checks["fc0_weight"]["detail"]
    assert main(["compress", str(model), "-o", str(out), "--prune", "2:4", "--scope",
                 "channel", "--force"]) == 2  # fmt: skip
    assert "--scope applies to unstructured" in capsys.readouterr().err


@pytest.mark.parametrize(
    "step", [["--palettize", "4"], ["--prune", "block2:0.5"], ["--prune", "2:4"],
             ["--quantize", "int8"], ["--quantize", "int4@b2"]],
)  # fmt: skip
def test_tiny_weights_with_min_size_0_are_left_dense_with_a_reason(
    save_program, tmp_path, capsys, step
):
    """Issue finding 10: `compress MODEL -o OUT --min-size 0 --palettize 4` (and block prune,
    quantize) crashed on a 1x1 or 0x64 weight ('NoneType' object has no attribute 'form')."""
    model = save_program(programs.tiny_weights(dtype=np.float16))
    out = tmp_path / "out.mlpackage"
    code = main(["compress", str(model), "-o", str(out), "--min-size", "0", "--json", *step])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = {w["name"]: w for w in json.loads(captured.out)["weights"]}
    for name in ("tiny", "w5", "empty"):
        assert not rows[name]["compressed"]
        assert rows[name]["reason"].startswith("too small to compress")
    assert rows["big"]["compressed"] and out.exists()


def test_a_bug_inside_a_pass_exits_3_and_a_user_error_exits_2(model, tmp_path, capsys, monkeypatch):
    """Issue finding 9: run_passes wrapped every exception of a pass as PassError, a user
    error to the CLI, so a bug inside a pass exited 2 instead of 3."""
    from milsparse.passes.prune import PruneWeights

    from milsparse.errors import ConfigError

    out = tmp_path / "out.mlpackage"
    args = ["compress", str(model), "-o", str(out), "--prune", "2:4"]

    def bug(self, cand, ios18, rewrites):
        raise KeyError("boom")

    monkeypatch.setattr(PruneWeights, "compress", bug)
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.startswith("milsparse: internal error: KeyError: 'boom' in milsparse::prune")
    assert err.count("\n") == 1 and "(rerun with --debug)" in err and not out.exists()

    def user_error(self, cand, ios18, rewrites):
        raise ConfigError(f"bad option for {cand.op.name}")

    monkeypatch.setattr(PruneWeights, "compress", user_error)
    assert main(args) == 2
    assert capsys.readouterr().err == "milsparse: error: bad option for fc0_weight\n"


@pytest.mark.parametrize(
    "step, reason",
    [(["--prune", "block100000000000:0.5"], "block100000000000:0.5: its output axis (0) "
      "has 128 < 100000000000 elements"),
     (["--prune", "block100000000000@in:0.5"], "block100000000000@in:0.5: its input axis (1) "
      "has 64 < 100000000000 elements"),
     (["--quantize", "int8@b100000000000"], "int8@b100000000000: 64 input channels are not a "
      "multiple of block_size 100000000000")],
)  # fmt: skip
def test_a_block_larger_than_the_weight_is_refused_before_any_work(
    model, tmp_path, capsys, step, reason
):
    """Issue finding 9: `block_size: 100000000000` tried to allocate terabytes and reported the
    MemoryError as a user error (exit 2). A block larger than the weight's axis leaves the
    weight dense with the reason (as coremltools skips a block size that does not divide it)."""
    out = tmp_path / "out.mlpackage"
    code = main(["compress", str(model), "-o", str(out), "--json", *step])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = {w["name"]: w for w in json.loads(captured.out)["weights"]}
    assert not rows["fc0_weight"]["compressed"]
    assert rows["fc0_weight"]["reason"].startswith(reason)


def test_a_recipe_block_larger_than_the_weight_is_refused_before_any_work(model, tmp_path, capsys):
    """Issue finding 9, the recipe form: `block_size: 100000000000` in prune and quantize."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "target: ios18\nsteps:\n"
        "  - prune: {pattern: block, block_size: 100000000000, sparsity: 0.5}\n"
        "  - quantize: {dtype: int4, granularity: per_block, block_size: 100000000000}\n"
    )
    out = tmp_path / "out.mlpackage"
    code = main(["compress", str(model), "-o", str(out), "--recipe", str(recipe), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert not any(w["compressed"] for w in report["weights"])
    reasons = " | ".join(str(w.get("reason")) for w in report["weights"])
    assert "< 100000000000 elements" in reasons


def test_keep_failed_writes_a_failing_output_and_exits_1(model, tmp_path, capsys):
    """Issue 15: a failing --verify threw a long run away; --keep-failed writes it, says so,
    and still exits 1. Without it nothing is written and the last line says what to try."""
    out = tmp_path / "kept.mlpackage"
    strict = ["compress", str(model), "-o", str(out), "--prune", "2:4", "--verify",
              "--min-snr", "200"]  # fmt: skip
    assert main(strict) == 1 and not out.exists()
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2] == f"verification failed; {out} not written"
    assert printed[-1].startswith("to try: ") and "--keep-failed" in printed[-1]
    assert main([*strict, "--keep-failed", "--json"]) == 1 and out.exists()
    report = json.loads(capsys.readouterr().out)
    assert report["output"] == str(out) and report["verify"]["passed"] is False
    assert main(["compress", str(model), "-o", str(tmp_path / "x.mlpackage"), "--prune", "2:4",
                 "--keep-failed"]) == 2  # fmt: skip
    assert "--keep-failed applies with --verify" in capsys.readouterr().err
