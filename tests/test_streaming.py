"""Values on disk while the passes run, and the weight file milsparse writes."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from milsparse.fixtures import programs

import milsparse as ms
from milsparse import _io, api


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
        m.setattr(_io, "_milsparse_blob_writer", _coremltools_writer)
        m.setattr(api, "Spill", _InMemory)
        theirs = ms.compress(path, recipe, output=tmp_path / "theirs.mlpackage")
    assert _digest(tmp_path / "ours.mlpackage") == _digest(tmp_path / "theirs.mlpackage")
    assert ours.get_spec() == theirs.get_spec()


def _coremltools_writer():
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
