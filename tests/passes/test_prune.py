import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
from milsparse.fixtures import programs
from milsparse.ir import masks
from milsparse.passes.prune import PruneWeights
from milsparse.passes.prune_config import (
    PruneConfig,
    PruneSpec,
    parse_prune_config,
    parse_prune_spec,
)

from milsparse.errors import ConfigError, UnsupportedModelError


def _ops(prog):
    """Op types in program order, plain consts left out."""
    return [op.op_type for op in prog.functions["main"].operations if op.op_type != "const"]


def _decision(pass_, name):
    return next(d for d in pass_.report if d.name == name)


def _op(prog, name):
    return next(op for op in prog.functions["main"].operations if op.name == name)


def _run(prog, config):
    pass_ = PruneWeights(config)
    pass_(prog)
    prog.validate()
    return pass_


def _materialize(op):
    out = op.materialized_val_inference()
    return out[-1] if isinstance(out, tuple) else out


@pytest.mark.parametrize("op_type", ["linear", "conv", "conv_transpose", "matmul"])
@pytest.mark.parametrize("opset", [ct.target.iOS16, ct.target.iOS17, ct.target.iOS18])
def test_op_sequence_and_values_after_the_pass(op_type, opset):
    prog = programs.single_op(op_type, opset=opset)
    weight = _op(prog, "weight").outputs[0].val.copy()
    pass_ = _run(prog, PruneConfig(PruneSpec("magnitude", sparsity=0.5), min_size=16))

    assert _ops(prog) == ["constexpr_sparse_to_dense", op_type]
    sparse = _op(prog, "weight")
    assert sparse.op_type == "constexpr_sparse_to_dense"
    layer = _op(prog, "layer")
    assert any(v is sparse.outputs[0] for v in layer.inputs.values())
    operands = {k: v.op.name for k, v in sparse.inputs.items()}
    if opset >= ct.target.iOS18:
        assert operands == {"nonzero_data": "weight_nonzero_data", "mask": "weight_mask"}
        assert sparse.mask.dtype == types.uint1 and sparse.mask.shape == weight.shape
    else:
        assert operands == {
            "nonzero_data": "weight_nonzero_data",
            "mask": "weight_mask",
            "shape": "weight_shape",
        }
        assert sparse.mask.dtype == types.uint8 and sparse.mask.shape == ((weight.size + 7) // 8,)
    expected = np.where(masks.magnitude_mask(weight, 0.5), weight, 0)
    np.testing.assert_array_equal(_materialize(sparse), expected)
    assert _decision(pass_, "weight").compressed


@pytest.mark.parametrize(
    "op_type, shape, transpose_y, input_axis",
    [
        ("linear", (16, 12), False, 1),
        ("conv", (8, 12, 3, 3), False, 1),
        ("conv_transpose", (12, 8, 3, 3), False, 0),
        ("matmul", (12, 16), False, 0),
        ("matmul", (16, 12), True, 1),
    ],
)
@pytest.mark.parametrize("axis_word", ["input", "output"])
def test_nm_groups_follow_each_ops_reduction_axis(
    op_type, shape, transpose_y, input_axis, axis_word
):
    prog = programs.single_op(op_type, shape=shape, transpose_y=transpose_y)
    weight = _op(prog, "weight").outputs[0].val.copy()
    pass_ = _run(prog, PruneConfig(PruneSpec("n:m", n=2, m=4, axis=axis_word), min_size=16))
    axis = input_axis if axis_word == "input" else (1 - input_axis)
    assert _decision(pass_, "weight").axis == axis
    pruned = _materialize(_op(prog, "weight"))
    groups = np.moveaxis(pruned, axis, -1)
    groups = groups.reshape(-1, groups.shape[-1] // 4, 4)
    assert np.all((groups == 0).sum(axis=-1) == 2)
    np.testing.assert_array_equal(pruned, np.where(masks.nm_mask(weight, 2, 4, axis), weight, 0))


def test_fp16_weight_larger_than_65504_elements_is_pruned_exactly():
    prog = programs.single_op("linear", shape=(300, 256), dtype=np.float16)
    weight = _op(prog, "weight").outputs[0].val.copy()
    assert weight.size > 65504
    pass_ = _run(prog, "unstructured:0.5")
    d = _decision(pass_, "weight")
    assert d.compressed and d.sparsity == pytest.approx(0.5, abs=1 / weight.size)
    pruned = _materialize(_op(prog, "weight"))
    assert pruned.dtype == np.float16
    assert (pruned == 0).sum() == weight.size // 2
    kept = pruned != 0
    np.testing.assert_array_equal(pruned[kept], weight[kept])  # bit-identical values
    assert (
        np.abs(weight[~kept]).astype(np.float32).max()
        <= np.abs(weight[kept]).astype(np.float32).min()
    )


def test_skip_reasons_and_untouched_program():
    prog = programs.mlp(sizes=(8, 16, 4))  # every weight is below the default min_size
    before = str(prog)
    pass_ = PruneWeights("unstructured:0.5")
    pass_(prog)
    assert str(prog) == before
    reasons = {d.name: d.reason for d in pass_.report}
    assert reasons["fc0_weight"] == "small: 128 elements < min_size 2048"
    assert reasons["fc0_bias"] == "not a weight: read by linear.bias"
    assert not any(d.compressed for d in pass_.report)


def test_one_dimensional_and_non_float_weights_are_left_dense():
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 64))], opset_version=ct.target.iOS18)
    def prog(x):
        v = mb.const(val=np.linspace(-1, 1, 64).astype(np.float32), name="vec")
        y = mb.mul(x=x, y=v, name="scale")
        idx = mb.const(val=np.arange(32, dtype=np.int32), name="idx")
        return mb.gather(x=y, indices=idx, axis=1, name="pick")

    before = str(prog)
    pass_ = _run(
        prog, PruneConfig(PruneSpec("magnitude", sparsity=0.5), op_names=("vec", "idx"), min_size=1)
    )
    assert str(prog) == before
    reasons = {d.name: d.reason for d in pass_.report}
    assert reasons == {"vec": "1-D", "idx": "not float: int32"}


def test_elementwise_constant_is_pruned_only_when_named():
    from coremltools.converters.mil import Builder as mb

    def build():
        @mb.program(input_specs=[mb.TensorSpec(shape=(64, 64))], opset_version=ct.target.iOS18)
        def prog(x):
            c = mb.const(
                val=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32),
                name="table",
            )
            return mb.add(x=x, y=c)

        return prog

    prog = build()
    pass_ = _run(prog, "unstructured:0.5")
    assert _decision(pass_, "table").reason == "not a weight: read by add.y"
    prog = build()
    pass_ = _run(prog, PruneConfig(PruneSpec("magnitude", sparsity=0.5), op_names=("table",)))
    assert _decision(pass_, "table").compressed
    assert _ops(prog) == ["constexpr_sparse_to_dense", "add"]


def test_second_run_leaves_compressed_weights_alone():
    prog = programs.single_op("linear")
    _run(prog, PruneConfig(PruneSpec("magnitude", sparsity=0.5), min_size=16))
    before = str(prog)
    pass_ = _run(prog, PruneConfig(PruneSpec("magnitude", sparsity=0.9), min_size=1))
    assert str(prog) == before
    reasons = {d.name: d.reason for d in pass_.report}
    # one row for the weight, named by its chain; none for the chain's own operands
    assert reasons["weight"] == "already compressed: sparse"
    assert "weight_nonzero_data" not in reasons and "weight_mask" not in reasons


def test_sparse_form_that_would_be_larger_is_not_emitted():
    prog = programs.single_op("linear", shape=(64, 64), dtype=np.float16)
    before = str(prog)
    # 3% sparsity: fp16 needs more than 1/16 to pay for the mask
    pass_ = _run(prog, PruneConfig(PruneSpec("magnitude", sparsity=0.03), min_size=16))
    assert str(prog) == before
    assert _decision(pass_, "weight").reason.startswith("sparse form would be larger:")


def test_threshold_below_minimum_sparsity_is_left_dense_with_reason():
    weight = np.full((64, 64), 0.5, np.float32)
    weight[:8] = 1e-4  # 12.5% of |w| <= 1e-3
    prog = programs.single_op("linear", weight=weight)
    spec = PruneSpec("threshold", threshold=1e-3, min_sparsity=0.2)
    pass_ = _run(prog, PruneConfig(spec, min_size=16))
    assert _decision(pass_, "weight").reason == "below minimum sparsity: 0.1250 < 0.2"
    prog = programs.single_op("linear", weight=weight)
    pass_ = _run(
        prog, PruneConfig(PruneSpec("threshold", threshold=1e-3, min_sparsity=0.1), min_size=16)
    )
    d = _decision(pass_, "weight")
    assert d.compressed and d.sparsity == 0.125


def test_non_finite_weights_are_left_dense():
    weight = np.ones((64, 64), np.float32)
    weight[3, 3] = np.nan
    pass_ = _run(
        programs.single_op("linear", weight=weight),
        PruneConfig(PruneSpec("magnitude", sparsity=0.5), min_size=16),
    )
    assert _decision(pass_, "weight").reason == "non-finite values (inf or nan)"


def test_shared_weight_is_pruned_once():
    prog = programs.shared_weight()
    pass_ = _run(prog, PruneConfig(PruneSpec("magnitude", sparsity=0.5), min_size=16))
    sparse_ops = [
        op for op in prog.functions["main"].operations if op.op_type == "constexpr_sparse_to_dense"
    ]
    assert sorted(op.name for op in sparse_ops) == ["embedding", "mix_weight"]
    emb = _decision(pass_, "embedding")
    assert emb.compressed and emb.consumers == ("embed.x", "lm_head.weight")
    mix = _decision(pass_, "mix_weight")
    assert mix.consumers == ("mix.weight", "mix_again.weight")


def test_shared_weight_with_different_specs_uses_the_least_aggressive():
    prog = programs.shared_weight()
    config = parse_prune_config(
        {"spec": "unstructured:0.8", "min_size": 16, "overrides": {"mix_again": "2:4"}}
    )
    pass_ = _run(prog, config)
    d = _decision(pass_, "mix_weight")
    assert d.compressed and d.spec == "2:4"
    assert "least aggressive" in d.note and "mix_again" in d.note


def test_consumer_override_to_dense_keeps_a_shared_weight_dense():
    prog = programs.shared_weight()
    config = parse_prune_config(
        {"spec": "2:4", "min_size": 16, "overrides": {"mix_again": "dense"}}
    )
    pass_ = _run(prog, config)
    assert (
        _decision(pass_, "mix_weight").reason
        == "left dense by override 'mix_again' on consumer mix_again"
    )
    assert _decision(pass_, "embedding").compressed


def test_override_on_the_weight_name_wins():
    prog = programs.mlp(sizes=(64, 64, 64, 64))
    config = parse_prune_config(
        {
            "spec": "2:4",
            "min_size": 16,
            "overrides": {"fc1_weight": "dense", "fc2*": "unstructured:0.75"},
        }
    )
    pass_ = _run(prog, config)
    assert _decision(pass_, "fc0_weight").spec == "2:4"
    assert _decision(pass_, "fc1_weight").reason == "left dense by override 'fc1_weight'"
    assert _decision(pass_, "fc2_weight").spec == "unstructured:0.75"
    assert _decision(pass_, "fc2_weight").sparsity == 0.75


def test_op_types_restrict_selection():
    prog = programs.cnn()
    pass_ = _run(
        prog, PruneConfig(PruneSpec("magnitude", sparsity=0.5), op_types=("linear",), min_size=16)
    )
    assert _decision(pass_, "head_weight").compressed
    assert _decision(pass_, "conv1_weight").reason == "not selected: op_types excludes conv"


def test_block_pruning_through_the_pass():
    prog = programs.single_op("conv", shape=(16, 8, 3, 3))
    weight = _op(prog, "weight").outputs[0].val.copy()
    pass_ = _run(prog, PruneConfig(PruneSpec("block", sparsity=0.5, block_size=4), min_size=16))
    d = _decision(pass_, "weight")
    assert d.compressed and d.axis == 0 and d.sparsity == 0.5
    expected = np.where(masks.block_mask(weight, 0.5, 4, 0), weight, 0)
    np.testing.assert_array_equal(_materialize(_op(prog, "weight")), expected)


def test_programs_below_ios16_raise_with_a_fix():
    prog = programs.single_op("linear", opset=ct.target.iOS15)
    with pytest.raises(UnsupportedModelError, match="minimum_deployment_target=ct.target.iOS16"):
        PruneWeights("2:4")(prog)


def test_pass_without_config_explains_how_to_set_one():
    with pytest.raises(ConfigError, match="set_options"):
        PruneWeights()(programs.single_op("linear"))


def test_registered_in_coremltools_and_configurable_with_strings():
    assert isinstance(PASS_REGISTRY["milsparse::prune"], PruneWeights)
    prog = programs.mlp(sizes=(64, 128, 64))
    pipeline = ct.PassPipeline.EMPTY
    pipeline.append_pass("milsparse::prune")
    pipeline.set_options("milsparse::prune", {"config": "spec: '2:4'\nmin_size: 16\n"})
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager

    PassPipelineManager.apply_pipeline(prog, pipeline)
    assert _ops(prog).count("constexpr_sparse_to_dense") == 2


def test_weights_not_selected_by_name_say_so():
    """Probe finding 18: a linear weight outside --op-names was reported as 'not a weight'."""
    prog = programs.mlp(sizes=(64, 128, 64))
    pass_ = _run(prog, PruneConfig(PruneSpec("n:m", n=2, m=4), op_names=("fc0*",), min_size=16))
    assert _decision(pass_, "fc0_weight").compressed
    assert _decision(pass_, "fc1_weight").reason == "not selected: no op_names pattern matches it"


def test_nm_on_an_axis_shorter_than_m_leaves_the_weight_dense():
    """Probe finding 3: 2:4 on a depthwise conv weight [64, 1, 7, 7] zeroed all of it (the
    short-group rule gives round(2 * 1 / 4) = 1 zero of 1), and 3:4 wiped any axis of 2."""
    for shape, spec in (((64, 1, 7, 7), "2:4"), ((32, 2, 3, 3), "3:4")):
        prog = programs.single_op("conv", shape=shape)
        weight = _op(prog, "weight").outputs[0].val.copy()
        pass_ = _run(prog, PruneConfig(parse_prune_spec(spec), min_size=16))
        d = _decision(pass_, "weight")
        assert not d.compressed and "input axis (1) has" in d.reason and "@out" in d.reason
        np.testing.assert_array_equal(_op(prog, "weight").outputs[0].val, weight)
    # asked for the output axis, the depthwise weight is pruned 2:4 along it
    prog = programs.single_op("conv", shape=(64, 1, 7, 7))
    pass_ = _run(prog, PruneConfig(parse_prune_spec("2:4@out"), min_size=16))
    assert _decision(pass_, "weight").compressed and _decision(pass_, "weight").sparsity == 0.5


def test_channel_scope_prunes_every_output_channel_to_the_same_sparsity():
    """After batchnorm folding, output channels differ in scale: a tensor-wide ranking empties
    the small ones, the per-channel ranking prunes each channel to the target."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    weight *= np.logspace(-3, 1, 16, dtype=np.float32)[:, None, None, None]
    results = {}
    for scope in ("tensor", "channel"):
        prog = programs.single_op("conv", shape=weight.shape, weight=weight)
        pass_ = _run(prog, PruneConfig(PruneSpec("magnitude", sparsity=0.3, scope=scope),
                                       min_size=16))  # fmt: skip
        d = _decision(pass_, "weight")
        assert d.compressed and d.sparsity == pytest.approx(0.3, abs=0.01)
        dense = _materialize(_op(prog, "weight"))
        results[scope] = (dense == 0).reshape(16, -1).sum(axis=1)
        if scope == "channel":
            assert d.axis == 0 and d.spec == "unstructured@channel:0.3"
    assert list(results["channel"]) == [22] * 16  # round(0.3 * 72) in every channel
    assert results["tensor"][0] == 72  # the smallest channel is wiped out


@pytest.mark.parametrize("spec", ["block2:0.5", "block4@in:0.5", "2:4", "unstructured:0.5"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tiny_weights_with_min_size_0_are_left_dense_with_a_reason(spec, dtype):
    """Issue finding 10: 1x1 and 0x64 weights crashed block prune with `--min-size 0`
    ('NoneType' object has no attribute 'form')."""
    prog = programs.tiny_weights(dtype=dtype)
    pass_ = _run(prog, {"spec": spec, "min_size": 0})
    for name, size in (("tiny", 1), ("w5", 5), ("empty", 0)):
        assert _decision(pass_, name).reason == (
            f"too small to compress: {size} elements (consts of at most 9 are stored inline)"
        )
        assert _op(prog, name).op_type == "const"
    assert _decision(pass_, "big").compressed


@pytest.mark.parametrize("spec, reason", [
    ("block100000000000:0.5", "block100000000000:0.5: its output axis (0) has 48 < "
     "100000000000 elements, a block larger than the axis (use a block size of at most 48)"),
    ("block65@in:0.5", "block65@in:0.5: its input axis (1) has 64 < 65 elements"),
])  # fmt: skip
def test_a_block_larger_than_its_axis_is_refused_before_any_work(spec, reason, monkeypatch):
    """Issue finding 9: block_size 100000000000 allocated a mask of terabytes (MemoryError);
    a block larger than the weight's axis now leaves it dense with the reason."""
    prog = programs.single_op("linear")  # [48, 64]

    def no_mask(*args, **kwargs):
        raise AssertionError("no mask is built for a refused block")

    monkeypatch.setattr(masks, "block_mask", no_mask)
    pass_ = _run(prog, {"spec": spec, "min_size": 16})
    assert _decision(pass_, "weight").reason.startswith(reason)
    assert _op(prog, "weight").op_type == "const"


def test_a_block_mask_longer_than_its_axis_is_the_whole_axis():
    """Issue finding 9: masks.block_mask never allocates a block longer than the axis."""
    w = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    huge = masks.block_mask(w, 0.4, 100_000_000_000, axis=1)
    np.testing.assert_array_equal(huge, masks.block_mask(w, 0.4, 5, axis=1))
    assert huge.all(axis=1).sum() == 4 and (~huge).all(axis=1).sum() == 2
