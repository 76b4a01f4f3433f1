import gc
import glob
import os
import tempfile
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from milsparse.fixtures import programs
from milsparse.fixtures.files import tree_digest
from milsparse.ir import formats, masks

import milsparse as ms
from milsparse.errors import ConfigError, UnsupportedModelError

EXAMPLE = Path(ms.__file__).parent.parent / "fixtures" / "example.mlpackage"
if not EXAMPLE.exists():  # installed (non-editable) layout
    from milsparse import fixtures as _fx

    EXAMPLE = Path(_fx.__file__).parent / "example.mlpackage"


def _values(model_or_path) -> dict[str, np.ndarray]:
    """Every weight of a model as the dense array Core ML would materialise."""
    prog = ms.load_program(model_or_path)
    out = {}
    for op in prog.functions["main"].operations:
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray):
            out[op.name] = op.outputs[0].val
        elif op.op_type == "constexpr_sparse_to_dense":
            val = op.materialized_val_inference()
            out[op.name] = val[-1] if isinstance(val, tuple) else val
    return out


def test_compress_a_saved_package_and_load_it_back(tmp_path, save_program):
    src = save_program(programs.mlp(sizes=(64, 128, 128, 10), dtype=np.float16))
    before = tree_digest(src)
    dense = _values(src)
    model, report = ms.compress_with_report(src, "unstructured:0.5")
    assert tree_digest(src) == before  # the input is never modified
    out = ms.save(model, tmp_path / "out.mlpackage")
    assert ms.load_program(out).functions["main"].opset_version == ct.target.iOS18
    loaded = _values(out)
    for d in report.decisions:
        w = dense[d.name]
        if d.compressed:
            np.testing.assert_array_equal(
                loaded[d.name], np.where(masks.magnitude_mask(w, 0.5), w, 0)
            )
        else:
            np.testing.assert_array_equal(loaded[d.name], w)
    assert [d.name for d in report.compressed] == ["fc0_weight", "fc1_weight"]


def test_size_on_disk_matches_the_byte_accounting(tmp_path, save_program):
    src = save_program(programs.transformer_block(d_model=64, d_ff=256))
    for spec in ("unstructured:0.5", "2:4", "block4:0.75"):
        out = ms.save(
            ms.compress(src, {"spec": spec, "min_size": 64}),
            tmp_path / f"{spec.replace(':', '_')}.mlpackage",
            overwrite=True,
        )
        weight_file = next(Path(out).rglob("weight.bin"))
        predicted = formats.BLOB_FILE_HEADER_BYTES + ms.inspect_model(out).totals()["stored_bytes"]
        # the last tensor of the file is not padded: at most one alignment off
        assert 0 <= predicted - weight_file.stat().st_size < formats.BLOB_ALIGNMENT


def test_same_input_and_recipe_give_a_byte_identical_package(tmp_path, save_program):
    src = save_program(programs.cnn())
    a = ms.save(ms.compress(src, "2:4"), tmp_path / "a.mlpackage")
    b = ms.save(ms.compress(src, "2:4"), tmp_path / "b.mlpackage")
    ms.compress(src, "2:4", output=tmp_path / "c.mlpackage")
    assert tree_digest(a) == tree_digest(b) == tree_digest(tmp_path / "c.mlpackage")


def test_compress_to_an_output_path(tmp_path, save_program):
    src = save_program(programs.mlp(sizes=(64, 128, 10)))
    out = tmp_path / "out.mlpackage"
    model = ms.compress(src, "2:4", output=out)
    assert Path(model.package_path) == out
    assert [r.format for r in ms.inspect_model(out).rows if r.name == "fc0_weight"] == ["sparse"]
    with pytest.raises(ConfigError, match="exists"):
        ms.compress(src, "2:4", output=out)
    ms.compress(src, "unstructured:0.75", output=out, overwrite=True)
    assert [r.sparsity for r in ms.inspect_model(out).rows if r.name == "fc0_weight"] == [0.75]
    with pytest.raises(ConfigError, match="never modifies its input"):
        ms.compress(src, "2:4", output=src, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage", "out.mlpackage"]


def test_no_temporary_package_outlives_the_model(save_program):
    src = save_program(programs.mlp(sizes=(64, 128, 10)))
    pattern = os.path.join(tempfile.gettempdir(), "milsparse-*")
    before = set(glob.glob(pattern))
    model = ms.compress(src, "2:4")
    assert len(set(glob.glob(pattern)) - before) == 1
    del model
    gc.collect()
    assert set(glob.glob(pattern)) - before == set()


def test_compress_accepts_an_mlmodel_without_mil_program(save_program):
    src = save_program(programs.mlp(sizes=(64, 128, 10)))
    mlmodel = ct.models.MLModel(str(src), skip_model_load=True)
    assert mlmodel._mil_program is None
    report = ms.compress_with_report(mlmodel, "2:4")[1]
    assert [d.name for d in report.compressed] == ["fc0_weight"]


def test_target_raises_the_opset_and_ios15_is_raised_to_ios16_with_a_note(tmp_path, save_program):
    """An iOS15 model (ct.convert's default for ML programs) is raised to iOS16 as coremltools
    does, and the report says so; a target given chooses the opset."""
    src = save_program(programs.mlp(sizes=(64, 128, 10), opset=ct.target.iOS15))
    for target in (None, "ios16", "ios17"):
        model, report = ms.compress_with_report(src, "2:4", target=target)
        raised = [n for n in report.notes if n.startswith("raised the model (iOS15) to iOS16")]
        assert len(raised) == (target is None)
        out = ms.save(model, tmp_path / f"out{target}.mlpackage")
        prog = ms.load_program(out)
        want = ct.target.iOS17 if target == "ios17" else ct.target.iOS16
        assert prog.functions["main"].opset_version == want
        assert ct.models.MLModel(str(out), skip_model_load=True).get_spec().specificationVersion \
            == want.value  # fmt: skip
        sparse = [op for op in prog.functions["main"].operations
                  if op.op_type == "constexpr_sparse_to_dense"]  # fmt: skip
        assert len(sparse) == 1 and "shape" in sparse[0].inputs  # the iOS16 form
    ios18 = save_program(programs.mlp(sizes=(64, 128, 10)), "ios18.mlpackage")
    with pytest.raises(ConfigError, match="cannot lower it to iOS17"):
        ms.compress(ios18, "2:4", target="ios17")


def test_non_mlprogram_and_missing_inputs_are_clear_errors(tmp_path):
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder

    builder = NeuralNetworkBuilder(
        [("x", datatypes.Array(4))], [("y", datatypes.Array(2))], disable_rank5_shape_mapping=True
    )
    builder.add_inner_product("fc", np.ones((2, 4)), None, 4, 2, False, "x", "y")
    nn_path = tmp_path / "nn.mlmodel"
    ct.models.MLModel(builder.spec, skip_model_load=True).save(str(nn_path))
    with pytest.raises(
        UnsupportedModelError, match="neuralNetwork model; milsparse works on ML programs"
    ):
        ms.compress(nn_path, "2:4")
    with pytest.raises(UnsupportedModelError, match="no such file"):
        ms.compress(tmp_path / "missing.mlpackage", "2:4")
    (tmp_path / "empty.mlpackage").mkdir()
    with pytest.raises(UnsupportedModelError, match="no Manifest.json"):
        ms.compress(tmp_path / "empty.mlpackage", "2:4")


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, save_program, monkeypatch):
    src = save_program(programs.mlp(sizes=(64, 128, 10)))
    model = ms.compress(src, "2:4")
    out = ms.save(model, tmp_path / "out.mlpackage")
    digest = tree_digest(out)
    with pytest.raises(ConfigError, match="exists"):
        ms.save(model, out)

    def broken_save(self, path):
        os.makedirs(path)
        Path(path, "partial").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(ct.models.MLModel, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ms.save(model, out, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        ms.save(model, tmp_path / "new.mlpackage")
    assert tree_digest(out) == digest  # the old package survives a failed overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage", "out.mlpackage"]


def test_bundled_example_compresses(tmp_path):
    model, report = ms.compress_with_report(EXAMPLE, "2:4")
    assert len(report.compressed) == 6
    assert all(d.sparsity == 0.5 for d in report.compressed)
    ms.save(model, tmp_path / "example.sparse.mlpackage")


def test_recipe_from_yaml(tmp_path, save_program):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        "target: ios18\n"
        "prune:\n"
        "  spec: unstructured:0.6\n"
        "  min_size: 64\n"
        "  overrides:\n"
        "    fc1*: dense\n"
        "    fc0_weight: {pattern: 'n:m', n: 1, m: 4}\n"
    )
    recipe = ms.Recipe.from_yaml(recipe_path)
    assert ms.Recipe.from_yaml(recipe.to_yaml()) == recipe
    src = save_program(programs.mlp(sizes=(64, 128, 64, 10)))
    report = ms.compress_with_report(src, recipe)[1]
    by_name = {d.name: d for d in report.decisions}
    assert by_name["fc0_weight"].spec == "1:4" and by_name["fc0_weight"].sparsity == 0.25
    assert by_name["fc1_weight"].reason == "left dense by override 'fc1*'"
    assert by_name["fc2_weight"].spec == "unstructured:0.6"


def test_run_passes_tells_a_bug_inside_a_pass_from_a_user_error():
    """Issue finding 9: run_passes wrapped every exception as PassError (a user error); a bug
    is now an InternalError (still a PassError) naming the pass, the original as its cause,
    and a MilsparseError the pass raised on purpose passes through unchanged."""
    from milsparse.passes.prune import PruneWeights

    from milsparse.errors import InternalError, PassError

    class Buggy(PruneWeights):
        def compress(self, cand, ios18, rewrites):
            raise ZeroDivisionError("boom")

    class Refusing(PruneWeights):
        def compress(self, cand, ios18, rewrites):
            raise ConfigError(f"bad option for {cand.op.name}")

    config = {"spec": "2:4", "min_size": 16}
    with pytest.raises(InternalError, match=r"ZeroDivisionError: boom in milsparse::prune, "
                       r"after \[first\]") as caught:  # fmt: skip
        ms.run_passes(programs.mlp(), [("first", lambda prog: None),
                                       ("milsparse::prune", Buggy(config))])  # fmt: skip
    assert isinstance(caught.value, PassError)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    with pytest.raises(ConfigError, match="bad option for fc0_weight") as caught:
        ms.run_passes(programs.mlp(), [("milsparse::prune", Refusing(config))])
    assert not isinstance(caught.value, PassError)


def test_run_passes_returns_the_report_and_passes_take_their_run_context():
    """Issue 15: run_passes returned None; passes got calibration and jobs set on them from
    outside. Now a pass is built with its RunContext and run_passes returns the report."""
    from milsparse.passes.palettize import PalettizeWeights
    from milsparse.passes.prune import PruneWeights
    from milsparse.passes.run_context import ReportSink, RunContext

    sink = ReportSink()
    context = RunContext(jobs=2, sink=sink)
    prog = programs.mlp(sizes=(64, 128, 10))
    report = ms.run_passes(prog, [
        ("milsparse::prune", PruneWeights({"spec": "2:4", "min_size": 16}, context)),
        ("milsparse::palettize", PalettizeWeights({"spec": "lut4", "min_size": 16,
                                                  "overrides": {"nothing*": None}}, context)),
        ("my::noop", lambda prog: None),
    ])  # fmt: skip
    assert isinstance(report, ms.CompressReport)
    assert [d.spec for d in report.decisions if d.compressed] == ["2:4 + lut4"] * 2
    assert report.notes == ["palettize: override 'nothing*' matched no weight or op of this model"]
    assert sorted(sink.reports) == ["milsparse::palettize", "milsparse::prune"]
    assert PruneWeights("2:4").context == RunContext()  # nothing shared between passes


def test_a_pipeline_s_reports_live_as_long_as_the_pipeline():
    """The reports of ct.convert runs were kept in a module dict of the last 64 runs; each
    pipeline now carries its own sink, found by key while the pipeline lives."""
    import gc

    from milsparse.passes.run_context import sink_for

    pipeline = ms.coreml_pipeline("2:4")
    key = pipeline.milsparse_reports.key
    assert sink_for(key) is pipeline.milsparse_reports
    del pipeline
    gc.collect()
    assert sink_for(key) is None


def test_check_recipe_takes_a_target_name_as_compress_does():
    """check_recipe(recipe, "ios16") raised TypeError ('<=' between AvailableTarget and str)."""
    from milsparse.errors import PipelineError

    taken = ms.check_recipe(["2:4", "lut4"], "ios18")
    assert [edges for _, edges in taken][1] == [("sparse", "sparse+palettized")]
    with pytest.raises(PipelineError, match="needs iOS18; the target is iOS16"):
        ms.check_recipe(ms.Recipe(["2:4", "lut4"]), "ios16")


def test_inspect_counts_the_sparsity_of_a_vector_palettized_joint_weight(save_program):
    """inspect showed 0.75 for block2@out:0.5 + lut4x2 (the mask of 2-element vectors was
    divided by the weight's element count); the compress report said 0.5."""
    src = save_program(programs.mlp(sizes=(64, 128, 128, 10)))
    small, report = ms.compress_with_report(src, ["block2@out:0.5", "lut4x2"], target="ios18")
    rows = {r.name: r for r in ms.inspect_model(small).rows}
    assert len(report.compressed) == 2  # the 10 x 128 head is below min_size
    for d in report.compressed:
        assert rows[d.name].sparsity == pytest.approx(d.sparsity)
        assert d.sparsity == pytest.approx(0.5, abs=0.02)


def test_save_and_inspect_take_a_program(tmp_path):
    """Issue 15: `ms.save(prog, path)` was an AttributeError and `ms.inspect_model(prog)` a
    refusal. A Program passed through run_passes is saved at the version its opset needs and
    reads back with the same weights and outputs; inspect reads the Program itself."""
    from milsparse.passes.prune import PruneWeights

    prog = programs.mlp(sizes=(64, 128, 10))
    ms.run_passes(prog, [("milsparse::prune", PruneWeights({"spec": "2:4", "min_size": 16}))])
    in_memory = ms.inspect_model(prog)
    assert [r.format for r in in_memory.rows if r.format != "dense"] == ["sparse"] * 2
    path = ms.save(prog, tmp_path / "pruned.mlpackage")
    assert path.resolve() == (tmp_path / "pruned.mlpackage").resolve()
    saved = ct.models.MLModel(str(path), skip_model_load=True)
    assert saved.get_spec().specificationVersion == prog.functions["main"].opset_version.value
    assert ms.inspect_model(path).to_dict()["weights"] == in_memory.to_dict()["weights"]
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    want, got = ms.evaluate(prog, {"x": x}), ms.evaluate(path, {"x": x})
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(ConfigError, match=r"exists; .*\(overwrite=True\)"):
        ms.save(prog, path)
    assert ms.save(prog, path, overwrite=True) == path


def test_the_report_counts_weights_apart_from_biases_and_rounds_specs_for_display():
    """Issue 15: biases were counted among "N of M weights" and then labelled "not a weight";
    a computed spec printed as unstructured:0.4666697184244792. Now the count is of weights,
    the other constants are said apart, and the table rounds what the JSON keeps exact."""
    example = Path(ms.fixtures.__file__).with_name("example.mlpackage")
    _, report = ms.compress_with_report(example, "unstructured:0.4666697184244792")
    totals = report.totals()
    assert (totals["weights"], totals["compressed"], totals["other_constants"]) == (6, 6, 10)
    text = str(report)
    assert "6 of 6 weights compressed (10 other constants left as they are);" in text
    assert "unstructured:0.4667" in text and "0.4666697184244792" not in text
    assert {d["spec"] for d in report.to_dict()["weights"] if d["compressed"]} == {
        "unstructured:0.4666697184244792"
    }
    assert ms.report.display_spec("block4@in:0.123456789 + lut4") == "block4@in:0.1235 + lut4"
