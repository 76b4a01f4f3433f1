"""milsparse inside ct.convert: torch modules converted with ms.coreml_pipeline."""

import coremltools as ct
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the test extra installs torch")

from milsparse.fixtures import torch_models  # noqa: E402
from milsparse.ir import masks  # noqa: E402

import milsparse as ms  # noqa: E402


def _main_ops(mlmodel):
    return list(mlmodel._mil_program.functions["main"].operations)


def _weights_by_consumer(mlmodel, op_type):
    """{consumer op name: dense weight} for every `op_type` op, materialising constexprs."""
    out = {}
    for op in _main_ops(mlmodel):
        if op.op_type != op_type:
            continue
        producer = op.weight.op
        if producer.op_type == "const":
            out[op.name] = producer.outputs[0].val
        else:
            val = producer.materialized_val_inference()
            out[op.name] = val[-1] if isinstance(val, tuple) else val
    return out


def test_convert_with_pipeline_prunes_fused_conv_batchnorm_weights():
    torch.manual_seed(0)
    module = torch_models.ConvBNNet()
    dense = torch_models.convert(module)
    sparse = torch_models.convert(module, pass_pipeline=ms.coreml_pipeline("unstructured:0.5"))
    types = [op.op_type for op in _main_ops(sparse)]
    assert "batch_norm" not in types  # conv+batchnorm still fused
    assert types.count("constexpr_sparse_to_dense") == 2  # conv1 and the head; conv0 is small
    dense_w = _weights_by_consumer(dense, "conv")
    sparse_w = _weights_by_consumer(sparse, "conv")
    assert dense_w.keys() == sparse_w.keys()
    pruned = 0
    for name, w in dense_w.items():
        assert w.dtype == np.float16  # pruning saw the weights after the fp16 cast
        if w.size >= 2048:
            np.testing.assert_array_equal(
                sparse_w[name], np.where(masks.magnitude_mask(w, 0.5), w, 0)
            )
            pruned += 1
        else:
            np.testing.assert_array_equal(sparse_w[name], w)
    assert pruned == 1
    assert all(op.bias is not None for op in _main_ops(sparse) if op.op_type == "conv")


def test_convert_tied_embeddings_prunes_the_shared_weight_once():
    mlmodel = torch_models.convert(
        torch_models.TiedLM(), pass_pipeline=ms.coreml_pipeline({"spec": "2:4", "min_size": 1024})
    )
    sparse = [op for op in _main_ops(mlmodel) if op.op_type == "constexpr_sparse_to_dense"]
    readers = {op.name: sorted(c.op_type for c in op.outputs[0].child_ops) for op in sparse}
    assert sorted(readers.values()) == [["gather", "linear"], ["linear"]]


def test_convert_for_ios16_emits_the_packed_mask_form():
    mlmodel = torch_models.convert(
        torch_models.MLP(), pass_pipeline=ms.coreml_pipeline("2:4"), target=ct.target.iOS16
    )
    sparse = [op for op in _main_ops(mlmodel) if op.op_type == "constexpr_sparse_to_dense"]
    assert sparse and all("shape" in op.inputs for op in sparse)


def test_convert_encoder_prunes_every_projection():
    mlmodel = torch_models.convert(
        torch_models.TinyEncoder(),
        pass_pipeline=ms.coreml_pipeline({"spec": "2:4", "min_size": 1024}),
    )
    linears = [op for op in _main_ops(mlmodel) if op.op_type == "linear"]
    # per layer: attention in-projection, out-projection and two feed-forward linears
    assert len(linears) == 8
    assert all(op.weight.op.op_type == "constexpr_sparse_to_dense" for op in linears)
    sparse = [r for r in ms.inspect_model(mlmodel).rows if r.format == "sparse"]
    # nn.TransformerEncoder deep-copies its layer, so const_deduplication shares the weights
    # of both layers: four weights, each pruned once for two readers
    assert len(sparse) == 4 and all(len(r.consumers) == 2 for r in sparse)
    assert all(r.sparsity == pytest.approx(0.5) for r in sparse)


def test_convert_prune_then_palettize_recipe_keeps_fusion_and_carries_the_report():
    """coreml_pipeline with a prune + palettize recipe inside ct.convert: conv+batchnorm stay
    fused, the pruned weights become constexpr_lut_to_sparse -> constexpr_sparse_to_dense, and
    conversion_report brings back the per-weight report and the pruning metadata that verify
    checks patterns with (coremltools runs fresh pass instances, so the passes' own state is
    gone)."""
    from milsparse.pruning_metadata import PRUNE_METADATA_KEY, declared_pruning

    recipe = ms.Recipe(["2:4", "lut4"], target="ios18")
    pipeline = ms.coreml_pipeline(recipe)
    assert [p for p in pipeline.passes if p.startswith("milsparse::")] == [
        "milsparse::prune",
        "milsparse::palettize",
    ]
    module = torch_models.ConvBNNet()
    mlmodel = torch_models.convert(module, pass_pipeline=pipeline)
    types = [op.op_type for op in _main_ops(mlmodel)]
    assert "batch_norm" not in types
    assert types.count("constexpr_lut_to_sparse") == 2  # conv1 and the head; conv0 is small
    report = ms.conversion_report(mlmodel, pipeline)
    joint = {d.name: d for d in report.compressed if d.spec == "2:4 + lut4"}
    assert len(joint) == 2
    declared = declared_pruning(mlmodel)
    assert set(declared) == set(joint) and {v["spec"] for v in declared.values()} == {"2:4"}
    assert PRUNE_METADATA_KEY in mlmodel.user_defined_metadata
    rows = {r.name: r for r in ms.inspect_model(mlmodel).rows}
    assert {rows[n].format for n in joint} == {"sparse+lut4"}
    # the same through ms.convert: one call, the same weights
    torch.manual_seed(0)
    module.eval()
    x = torch_models.example_input(module)
    again, again_report = ms.convert_with_report(
        torch.jit.trace(module, x),
        recipe,
        inputs=[ct.TensorType(name="x", shape=tuple(x.shape))],
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    assert [d.spec for d in again_report.decisions] == [d.spec for d in report.decisions]
    assert declared_pruning(again) == declared


def test_convert_checks_the_chain_against_the_target():
    with pytest.raises(ms.PipelineError, match=r"step 2 \(palettize lut4\).*set the target"):
        ms.coreml_pipeline(["2:4", "lut4"], target=ct.target.iOS16)
    with pytest.raises(ms.ConfigError, match="no milsparse pass of this pipeline has run"):
        ms.conversion_report(None, ms.coreml_pipeline("2:4"))


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_data_aware_pruning_of_a_converted_cnn(tmp_path, criterion):
    """A torch CNN (conv + batchnorm fused, padding 1) pruned 2:4 with calibration inputs
    through the conv im2col statistics; the patterns verify, and SparseGPT's outputs move
    less than magnitude pruning's on held-out inputs (Wanda's ranking is a heuristic that an
    untrained network with Gaussian inputs gives nothing to work with: not compared here)."""
    module = torch_models.ConvBNNet()
    dense = torch_models.convert(module, precision=ct.precision.FLOAT32)
    path = tmp_path / "cnn.mlpackage"
    dense.save(str(path))
    rng = np.random.default_rng(0)
    shape = (1, 3, 16, 16)
    calib = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(6)]
    held_out = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(6)]
    recipe = {"spec": "2:4", "criterion": criterion, "min_size": 1024}
    pruned, report = ms.compress_with_report(path, recipe, calibration=calib)
    assert all(d.note.startswith(f"{criterion}, 6 samples") for d in report.compressed)
    check = ms.verify(path, pruned, held_out)
    assert all(w.pattern_holds for w in check.weights if w.pattern)
    if criterion == "sparsegpt":
        magnitude = ms.compress(path, {"spec": "2:4", "min_size": 1024})
        baseline = ms.verify(path, magnitude, held_out)
        assert check.outputs[0].snr_db > baseline.outputs[0].snr_db + 3


def test_conversion_report_names_weights_as_the_converted_model_does():
    """An nn.Sequential's weights start with a digit (`0.weight`): coremltools renames them
    `op_0_weight...`; the report and the pruning metadata kept the torch names, so verify
    never checked their pattern."""
    from milsparse.pruning_metadata import declared_pruning

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)
    )
    module.eval()
    x = torch.randn(2, 64)
    model, report = ms.convert_with_report(
        torch.jit.trace(module, x),
        "2:4",
        inputs=[ct.TensorType(name="x", shape=tuple(x.shape))],
        minimum_deployment_target=ct.target.iOS18,
        skip_model_load=True,
    )
    rows = {r.name for r in ms.inspect_model(model).rows}
    names = {d.name for d in report.compressed}
    assert names and names <= rows and all(n.startswith("op_") for n in names)
    assert set(declared_pruning(model)) == names


def test_a_classifier_model_compresses_and_its_class_labels_are_left_alone(tmp_path):
    """A classifier's class labels are a list const (a ListVar, no shape): reading it as a
    weight crashed compress, the drop-in and inspect ("shape not applicable to ListVar")."""
    from milsparse import coreml as drop

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                 torch.nn.Linear(128, 3)).eval()  # fmt: skip
    traced = torch.jit.trace(module, torch.zeros(1, 64))
    for labels in (["a", "b", "c"], [0, 1, 2]):
        mlmodel = ct.convert(
            traced, inputs=[ct.TensorType(name="x", shape=(1, 64))], convert_to="mlprogram",
            classifier_config=ct.ClassifierConfig(labels),
            minimum_deployment_target=ct.target.iOS16,
        )  # fmt: skip
        _, report = ms.compress_with_report(mlmodel, "2:4")
        assert [d.name for d in report.compressed] == ["op_0_weight_to_fp16"]
        config = ct.optimize.coreml.OptimizationConfig(
            global_config=ct.optimize.coreml.OpMagnitudePrunerConfig(target_sparsity=0.5)
        )
        pruned = drop.prune_weights(mlmodel, config)
        ops = [op.op_type for op in pruned._mil_program.functions["main"].operations]
        assert "classify" in ops and ops.count("constexpr_sparse_to_dense") == 1
        assert "op_0_weight_to_fp16" in str(ms.inspect_model(pruned))


def test_ios26_is_a_target_everywhere_one_is_named(tmp_path):
    """coremltools 9 names iOS26 (specification 10): a torch model converted at iOS26 with
    coreml_pipeline gets the iOS18 forms (iOS26 keeps iOS18's constexpr ops), a recipe may
    name it, and compressing the iOS26 package keeps its target."""
    recipe = ms.Recipe([{"prune": "2:4"}, {"palettize": "lut4"}], "ios26")
    mlmodel = torch_models.convert(
        torch_models.MLP(), pass_pipeline=ms.coreml_pipeline(recipe, target=ct.target.iOS26),
        target=ct.target.iOS26,
    )  # fmt: skip
    assert mlmodel.get_spec().specificationVersion == 10
    joint = [op for op in _main_ops(mlmodel) if op.op_type == "constexpr_lut_to_sparse"]
    assert joint and all(op.indices_mask.dtype == ct.converters.mil.mil.types.uint1 for op in joint)
    dense = torch_models.convert(torch_models.MLP(), target=ct.target.iOS26)
    _, report = ms.compress_with_report(dense, recipe)
    assert report.target == "iOS26" and report.compressed
    out = ms.save(ms.compress(dense, "2:4"), tmp_path / "o.mlpackage")
    assert ct.models.MLModel(str(out), skip_model_load=True).get_spec().specificationVersion == 10
