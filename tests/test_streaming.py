"""Values on disk while the passes run, and the weight file milsparse writes."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from milsparse.fixtures import programs

import milsparse as ms
from milsparse import api, ct_hooks


def _digest(package):
    data = package / "Data" / "com.apple.CoreML"
    return {
        name: hashlib.sha256((data / name).read_bytes()).hexdigest()
        for name in ("model.mlmodel", "weights/weight.bin")
    }


class _InMemory:
    """Stands for `Spill`: every value stays in memory."""

    def __init__(self, folder):
        pass

    def put(self, value):
        return value

    def close(self):
        pass


RECIPES = ["2:4", "unstructured:0.6", ["2:4", "lut4"], ["unstructured:0.5", "int8"], "lut3",
           "int4@b16", "block4@0:0.5"]  # fmt: skip


@settings(max_examples=12, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([16, 32, 48, 96]), min_size=2, max_size=4),
    dtype=st.sampled_from([np.float16, np.float32]),
    recipe=st.sampled_from(RECIPES),
    seed=st.integers(0, 1000),
)
def test_spilled_and_in_memory_runs_write_the_same_bytes(
    tmp_path_factory, sizes, dtype, recipe, seed
):
    folder = tmp_path_factory.mktemp("stream")
    src = folder / "dense.mlpackage"
    prog = programs.mlp(sizes=(32, *sizes, 10), dtype=dtype, seed=seed)
    programs.program_to_mlmodel(prog).save(str(src))
    streamed = ms.compress(src, recipe, output=folder / "streamed.mlpackage")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(api, "Spill", _InMemory)
        in_memory = ms.compress(src, recipe, output=folder / "memory.mlpackage")
    assert _digest(folder / "streamed.mlpackage") == _digest(folder / "memory.mlpackage")
    assert streamed.get_spec() == in_memory.get_spec()
    assert not [p for p in folder.iterdir() if "milsparse-tmp" in p.name]  # spill removed


@pytest.mark.parametrize("recipe", ["2:4", ["2:4", "lut4"], ["unstructured:0.5", "int4"]])
def test_the_weight_file_is_coremltools_own(save_program, tmp_path, monkeypatch, recipe):
    """Serialising one program with milsparse's writer and with coremltools' gives the same
    bytes: the same records in the same order, sub-byte masks and indices packed alike."""
    path = save_program(programs.transformer_block(dtype=np.float16))
    ours = ms.compress(path, recipe, output=tmp_path / "ours.mlpackage")
    with monkeypatch.context() as m:
        m.setattr(ct_hooks, "milsparse_blob_writer", _coremltools_writer)
        m.setattr(api, "Spill", _InMemory)
        theirs = ms.compress(path, recipe, output=tmp_path / "theirs.mlpackage")
    assert _digest(tmp_path / "ours.mlpackage") == _digest(tmp_path / "theirs.mlpackage")
    assert ours.get_spec() == theirs.get_spec()


def _coremltools_writer(on_bytes=None):
    import contextlib

    return contextlib.nullcontext()


def test_the_spill_sits_beside_the_output_and_is_gone_after(save_program, tmp_path, monkeypatch):
    path = save_program(programs.mlp(sizes=(64, 256, 256, 10), dtype=np.float16))
    seen = []
    real = api.Spill

    class Watched(real):
        def put(self, value):
            mapped = real.put(self, value)
            seen.append((self.path, mapped is not value))
            return mapped

    monkeypatch.setattr(api, "Spill", Watched)
    out = tmp_path / "out" / "model.mlpackage"
    out.parent.mkdir()
    ms.compress(path, "2:4", output=out)
    spilled = [p for p, mapped in seen if mapped]
    assert spilled and all(p.startswith(str(out.parent)) for p in spilled)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.mlpackage"]


@pytest.mark.parametrize(
    "recipe", ["2:4", "unstructured:0.5", ["2:4", "lut4"], ["block2@0:0.5", "int8"], "lut4x2"]
)
def test_jobs_do_not_change_the_output(save_program, tmp_path, recipe):
    path = save_program(programs.mlp(sizes=(64, 128, 96, 128, 32, 10), dtype=np.float16))
    digests = []
    for jobs in (1, 3):
        out = tmp_path / f"jobs{jobs}.mlpackage"
        _, report = ms.compress_with_report(path, recipe, output=out, jobs=jobs)
        digests.append((_digest(out), [d.to_dict() for d in report.decisions]))
    assert digests[0] == digests[1]
    assert sum(d["compressed"] for d in digests[0][1]) >= 4


def test_jobs_with_calibration_do_not_change_the_output(save_program, tmp_path):
    path = save_program(programs.mlp(sizes=(64, 128, 96, 10), dtype=np.float16))
    rng = np.random.default_rng(0)
    cal = [{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(4)]
    for config in ({"spec": "2:4", "criterion": "wanda"},
                   {"spec": "unstructured:0.5", "criterion": "sparsegpt"}):  # fmt: skip
        digests = []
        for jobs in (1, 2):
            out = tmp_path / f"{config['criterion']}{jobs}.mlpackage"
            ms.compress(path, config, output=out, calibration=cal, jobs=jobs)
            digests.append(_digest(out))
        assert digests[0] == digests[1], config


@pytest.mark.parametrize("jobs", [0, -2, 1.5, True])
def test_bad_jobs_are_config_errors(save_program, tmp_path, jobs):
    path = save_program(programs.mlp(sizes=(64, 128, 10)))
    with pytest.raises(ms.ConfigError, match="jobs must be"):
        ms.compress(path, "2:4", jobs=jobs)


def test_cli_jobs(save_program, tmp_path, capsys):
    from milsparse.cli import main

    path = save_program(programs.mlp(sizes=(64, 128, 10)))
    out = tmp_path / "o.mlpackage"
    assert main(["compress", str(path), "-o", str(out), "--prune", "2:4", "--jobs", "0"]) == 2
    assert "--jobs must be an integer >= 1" in capsys.readouterr().err and not out.exists()
    assert main(["compress", str(path), "-o", str(out), "--prune", "2:4", "--jobs", "2"]) == 0


def test_generated_large_packages_load_and_differ_per_layer(tmp_path):
    from milsparse.fixtures.large import linear_stack_package

    path = linear_stack_package(tmp_path / "stack.mlpackage", layers=3, width=64, seed=1)
    prog = ms.load_program(path)
    weights = [op.outputs[0].val for op in prog.functions["main"].operations
               if op.op_type == "const" and op.name.endswith("_weight")]  # fmt: skip
    assert len(weights) == 3 and all(w.shape == (64, 64) and w.dtype == np.float16 for w in weights)
    assert not np.array_equal(weights[0], weights[1])
    w = weights[0].astype(np.float64)
    kurtosis = ((w - w.mean()) ** 4).mean() / w.var() ** 2
    assert kurtosis > 4  # heavy-tailed, as trained weights are (a normal's is 3)
    out = ms.evaluate(path, {"x": np.ones((1, 64), np.float32)})
    assert out["y"].shape == (1, 64) and np.isfinite(out["y"]).all()


def test_a_byte_budget_keeps_large_weights_one_at_a_time(save_program, tmp_path, monkeypatch):
    """With the in-flight budget below one weight, weights go one at a time (and the bytes are
    still the serial run's)."""
    from concurrent.futures import ThreadPoolExecutor

    from milsparse.passes import _weight_pass

    path = save_program(programs.mlp(sizes=(64, 128, 96, 128, 10), dtype=np.float16))
    serial = tmp_path / "serial.mlpackage"
    ms.compress(path, "2:4", output=serial, jobs=1)
    most = []
    real_submit = ThreadPoolExecutor.submit
    in_flight = set()

    def submit(self, fn, *args):
        future = real_submit(self, fn, *args)
        in_flight.add(future)
        in_flight.difference_update({f for f in in_flight if f.done()})
        most.append(len(in_flight))
        return future

    monkeypatch.setattr(ThreadPoolExecutor, "submit", submit)
    monkeypatch.setattr(_weight_pass, "IN_FLIGHT_BYTES", 1)
    out = tmp_path / "budget.mlpackage"
    ms.compress(path, "2:4", output=out, jobs=2)
    assert most and max(most) == 1
    assert _digest(out) == _digest(serial)
