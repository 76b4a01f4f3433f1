"""The one sample reader (`verify --inputs`, `compress --calibration`) and the check that
input values fit the input's dtype: damaged, disguised and mixed `.npz` files are refused with
our own message, naming the file, entry or input (issue findings 8, 11 and the minor ones)."""

import numpy as np
import pytest
from milsparse.fixtures import programs
from milsparse.ir import samples

import milsparse as ms
from milsparse.cli import main
from milsparse.errors import ConfigError

WANDA = {"spec": "2:4", "criterion": "wanda", "min_size": 512}


@pytest.fixture
def mlp(save_program):
    return save_program(programs.mlp(sizes=(64, 256, 10)), "mlp.mlpackage")


def _both(path, mlp, source):
    """The errors of the two readers of `source`: verify's inputs and compress's calibration."""
    errors = []
    for call in (
        lambda: ms.verify(mlp, mlp, source),
        lambda: ms.compress(mlp, WANDA, calibration=source),
    ):
        with pytest.raises(ConfigError) as info:
            call()
        errors.append(str(info.value))
    return errors


def test_a_bare_npy_named_npz_is_refused_by_both_readers(mlp, tmp_path, capsys):
    """Finding 11: a bare .npy renamed .npz exited 3 in `compress --calibration` (2 in
    `verify --inputs`); both exit 2 with the same message."""
    bare = tmp_path / "bare.npz"
    with open(bare, "wb") as f:
        np.save(f, np.ones((3, 2, 64), np.float32))
    for error in _both(bare, mlp, bare):
        assert "a single array (.npy), not a .npz archive" in error and str(bare) in error
    out = tmp_path / "o.mlpackage"
    compress = ["compress", str(mlp), "-o", str(out), "--prune", "2:4", "--criterion", "wanda",
                "--min-size", "512", "--calibration", str(bare)]  # fmt: skip
    for args in (compress, ["verify", str(mlp), str(mlp), "--inputs", str(bare)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "not a .npz archive" in err and err.count("\n") == 1
    assert not out.exists()


def test_a_file_that_is_not_a_zip_gets_our_message(mlp, tmp_path):
    """Minor finding: a non-zip .npz got numpy's message about pickled data."""
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"hello, not an archive")
    for error in _both(junk, mlp, junk):
        assert "not a .npz archive" in error and "pickle" not in error


def test_only_the_input_entries_are_read_and_the_others_are_named(mlp, tmp_path):
    """Minor finding: an object array in an extra entry failed the whole file with a pickle
    error; the extra entries are named instead, and never read."""
    verify_file, calibration_file = tmp_path / "v.npz", tmp_path / "c.npz"
    junk = np.array([{"a": 1}], dtype=object)
    np.savez(verify_file, x=np.ones((2, 64), np.float32), labels=junk)
    np.savez(calibration_file, x=np.ones((3, 2, 64), np.float32), labels=junk)
    for error in (*_both(verify_file, mlp, verify_file)[:1],
                  *_both(calibration_file, mlp, calibration_file)[1:]):  # fmt: skip
        assert "'labels'" in error and "not inputs of the model" in error
        assert "pickle" not in error
    np.savez(verify_file, x=junk)
    for error in _both(verify_file, mlp, verify_file):
        assert "entry 'x' holds Python objects" in error and "pickle" not in error


def test_a_file_truncated_while_it_is_read_is_a_user_error(mlp, tmp_path, monkeypatch, capsys):
    """Minor finding: an input file truncated while being read exited 3 (EOFError)."""
    path = tmp_path / "x.npz"
    real_load = np.load

    def load_then_truncate(file, *args, **kwargs):
        data = real_load(file, *args, **kwargs)
        with open(file, "r+b") as f:  # another process cuts the file after it was opened
            f.truncate(100)
        return data

    monkeypatch.setattr(np, "load", load_then_truncate)
    cases = {
        "verify": (["verify", str(mlp), str(mlp), "--inputs", str(path)], (2, 64)),
        "compress": (["compress", str(mlp), "-o", str(tmp_path / "o.mlpackage"), "--prune",
                      "2:4", "--criterion", "wanda", "--min-size", "512", "--calibration",
                      str(path)], (3, 2, 64)),
    }  # fmt: skip
    for args, shape in cases.values():
        np.savez(path, x=np.ones(shape, np.float32))
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{path}: cannot read entry 'x'" in err and "truncated" in err
    np.savez(path, x=np.ones((2, 64), np.float32))
    with open(path, "r+b") as f:  # truncated before it is read
        f.truncate(300)
    monkeypatch.setattr(np, "load", real_load)
    for error in _both(path, mlp, path):
        assert "not a .npz archive" in error and "truncated" in error


def test_integer_values_that_do_not_fit_the_input_are_refused(save_program):
    """Minor finding: int64 ids of 2^40 were accepted for an int32 input (and wrapped)."""
    path = save_program(programs.shared_weight(vocab=7), "ids.mlpackage")
    ids = np.array([[1, 2, 3, 4, 2**40]], np.int64)
    with pytest.raises(ConfigError, match=r"input 'ids' holds 1099511627776, .*int32"):
        ms.verify(path, path, {"ids": ids})
    with pytest.raises(ConfigError, match=r"calibration sample 0: input 'ids'.*int32"):
        ms.compress(path, WANDA, calibration=[{"ids": ids}])
    fits = np.array([[1, 2, 3, 4, 5]], np.int64)
    assert ms.verify(path, path, {"ids": fits}).passed


def test_float_values_that_overflow_the_input_dtype_are_refused(mlp, save_program):
    """Finding 8: float64 1e300 for an fp32 input (or 1e30 for an fp16 one) became inf in the
    cast, silently; such values are refused, naming the input."""
    big = np.full((2, 64), 1e300)
    with pytest.raises(ConfigError, match=r"input 'x' holds 1e\+300, .* fp32"):
        ms.verify(mlp, mlp, {"x": big})
    with pytest.raises(ConfigError, match=r"calibration sample 1: input 'x' holds 1e\+300"):
        ms.compress(mlp, WANDA, calibration=[{"x": np.ones((2, 64))}, {"x": big}])
    ms.verify(mlp, mlp, {"x": np.full((2, 64), 1e30)})  # fits float32: fine
    assert samples.value_problem(np.float32([1e30]), np.float16) is not None
    assert samples.value_problem(np.float32([65504]), np.float16) is None
    assert samples.value_problem(np.int64([-129]), np.int8) is not None
    assert samples.value_problem(np.uint64([2**63]), np.int64) is not None
    assert samples.value_problem(np.float64([np.nan]), np.float16) is None  # not a range problem
