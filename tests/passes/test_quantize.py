"""milsparse::quantize: every form decodes exactly as coremltools decodes it, every value within
half a step of its level, the joint form on sparse weights, and the chain with pruning."""

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil.mil import types
from milsparse.fixtures import programs
from milsparse.ir.chain import Form, weight_chain
from milsparse.passes.prune import PruneWeights
from milsparse.passes.prune_config import PruneConfig, parse_prune_spec
from milsparse.passes.quant_config import (
    QuantizeSpec,
    parse_quantize_config,
    parse_quantize_spec,
)
from milsparse.passes.quantize import QuantizeWeights, quantize_blockwise

import milsparse as ms
from milsparse.errors import ConfigError

SHAPE = (64, 96)


def _program(dtype, opset, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, SHAPE) * 0.05 * rng.lognormal(0, 0.7, (SHAPE[0], 1))
    w = w.astype(dtype)
    return w, programs.single_op("linear", dtype=dtype, shape=SHAPE, weight=w, opset=opset)


def _quantize(prog, spec):
    pass_ = QuantizeWeights({"spec": spec, "min_size": 16})
    pass_(prog)
    prog.validate()
    return next(d for d in pass_.report if d.name == "weight")


def _weight_op(prog):
    return next(o for o in prog.functions["main"].operations if o.name == "weight")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(
    "opset, spec, op_type, label",
    [
        (ct.target.iOS18, "int8", "constexpr_blockwise_shift_scale", "int8"),
        (ct.target.iOS18, "uint8@t:affine", "constexpr_blockwise_shift_scale", "uint8"),
        (ct.target.iOS18, "int4@b32", "constexpr_blockwise_shift_scale", "int4"),
        (ct.target.iOS18, "uint4@b16:affine", "constexpr_blockwise_shift_scale", "uint4"),
        (ct.target.iOS16, "int8", "constexpr_affine_dequantize", "int8"),
        (ct.target.iOS16, "uint8@t:affine", "constexpr_affine_dequantize", "uint8"),
    ],
)
def test_every_form_decodes_exactly_within_half_a_step(dtype, opset, spec, op_type, label):
    w, prog = _program(dtype, opset)
    d = _quantize(prog, spec)
    assert d.compressed and d.spec == spec, d.reason
    op = _weight_op(prog)
    chain = weight_chain(op)
    assert op.op_type == op_type and chain.form is Form.QUANTIZED and chain.label == label
    assert chain.stored_bytes == d.stored_bytes < d.dense_bytes
    ours = chain.decode()
    np.testing.assert_array_equal(ours, np.asarray(op.materialized_val_inference(), np.float32))
    parsed = parse_quantize_spec(spec)
    scale_shape = [1, 1]
    if parsed.granularity != "per_tensor":
        scale_shape[0] = SHAPE[0]
    if parsed.granularity == "per_block":
        scale_shape[1] = SHAPE[1] // parsed.block_size
    q, scale, _ = quantize_blockwise(w, scale_shape, parsed)
    step = np.broadcast_to(
        np.repeat(np.repeat(scale.astype(np.float64), SHAPE[0] // scale.shape[0], 0),
                  SHAPE[1] // scale.shape[1], 1), SHAPE)  # fmt: skip
    # half a step, plus the rounding of the product to the weight's dtype
    bound = step / 2 + np.abs(w.astype(np.float64)) * np.finfo(dtype).eps
    assert np.all(np.abs(ours - w.astype(np.float64)) <= bound * (1 + 1e-6))


def test_sparse_weights_get_the_joint_form_with_ranges_from_their_nonzeros():
    w, prog = _program(np.float16, ct.target.iOS18, seed=3)
    PruneWeights(PruneConfig(parse_prune_spec("2:4"), min_size=16))(prog)
    pruned = weight_chain(_weight_op(prog)).decode()
    d = _quantize(prog, "int4")
    assert d.compressed and d.spec == "sparse+int4"
    root = _weight_op(prog)
    chain = weight_chain(root)
    assert root.nonzero_data.op.op_type == "constexpr_sparse_blockwise_shift_scale"
    assert chain.form is Form.SPARSE_QUANTIZED and chain.label == "sparse+int4"
    ours = chain.decode()
    np.testing.assert_array_equal(ours, np.asarray(root.materialized_val_inference(), np.float32))
    assert np.array_equal(ours == 0, pruned == 0) or np.all(ours[pruned == 0] == 0)
    kept = pruned != 0
    err = np.abs(ours[kept] - pruned[kept]).max()
    per_row = np.abs(np.where(kept, pruned, 0)).max(axis=1)
    assert err <= (per_row.max() / 7) / 2 * 1.01  # half a step of the widest row's nonzeros


def test_quantize_then_prune_keeps_quantized_values_bit_identical():
    _, prog = _program(np.float16, ct.target.iOS18, seed=4)
    _quantize(prog, "int8")
    before = weight_chain(_weight_op(prog)).decode()
    PruneWeights(PruneConfig(parse_prune_spec("2:4"), min_size=16))(prog)
    chain = weight_chain(_weight_op(prog))
    assert chain.label == "sparse+int8"
    after = chain.decode()
    kept = after != 0
    np.testing.assert_array_equal(after[kept], before[kept])


def test_what_is_left_as_it_is_says_why():
    _, prog = _program(np.float16, ct.target.iOS16)
    assert "needs iOS18" in _quantize(prog, "int4").reason
    _, prog = _program(np.float16, ct.target.iOS18)
    assert (
        "input channels are not a multiple of block_size 64" in _quantize(prog, "int8@b64").reason
    )


@pytest.mark.parametrize(
    "value, message",
    [("int2", "bad quantize spec"), ("int8:median", "bad mode"), ("int8@b0", "block_size"),
     ({"spec": "int8", "extra": 1}, "unknown quantize config keys")],
)  # fmt: skip
def test_bad_quantize_configs_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_quantize_config(value)


def test_spec_strings_read_back():
    for text in ("int8", "int8@t", "int4@b32", "uint8:affine", "uint4@b16:affine"):
        assert parse_quantize_spec(text).to_string() == text


def test_configs_read_yaml_and_json_text_as_set_options_hands_them():
    config = parse_quantize_config("spec: int4@b32\nmin_size: 16\n")
    assert config.spec == parse_quantize_spec("int4@b32") and config.min_size == 16
    assert parse_quantize_config('{"spec": "uint8:affine"}').spec.mode == "linear"
    assert parse_quantize_config({"dtype": "int8", "granularity": "per_tensor"}).spec == (
        parse_quantize_spec("int8@t")
    )


def _decoded_and_steps(prog):
    """(coremltools' decode of the weight, the step of every element from its stored scale,
    the kept positions): iOS18 blockwise, iOS16 affine, and the sparse joint form."""
    root = _weight_op(prog)
    decoded = np.asarray(root.materialized_val_inference())
    shape = decoded.shape
    kept = np.ones(shape, bool)
    quant = root
    if root.op_type == "constexpr_sparse_to_dense":
        quant = root.nonzero_data.op
        kept = np.asarray(quant.data_mask.val) != 0
    scale = np.asarray(quant.scale.val).astype(np.float64)
    if quant.op_type == "constexpr_affine_dequantize" and scale.size > 1:
        axis = int(quant.axis.val)
        scale = scale.reshape([-1 if d == axis else 1 for d in range(len(shape))])
    elif scale.ndim == len(shape):
        for axis, (size, blocks) in enumerate(zip(shape, scale.shape, strict=True)):
            scale = np.repeat(scale, size // blocks, axis=axis)
    return decoded, np.broadcast_to(scale, shape), kept


def _assert_finite_within_half_a_step(prog, w):
    decoded, step, kept = _decoded_and_steps(prog)
    assert decoded.dtype == w.dtype
    assert np.all(np.isfinite(decoded)), f"{np.count_nonzero(~np.isfinite(decoded))} not finite"
    # half a step, plus the decoder's rounding of the product to the weight's dtype
    bound = step / 2 + np.spacing(np.abs(decoded)).astype(np.float64) / 2
    err = np.abs(decoded.astype(np.float64) - w.astype(np.float64))
    assert np.all(err[kept] <= bound[kept]), np.max((err - bound)[kept])


QUANT_FORMS = [
    (ct.target.iOS18, "int8"),
    (ct.target.iOS18, "int8@t"),
    (ct.target.iOS18, "int4"),
    (ct.target.iOS18, "int4@b32"),
    (ct.target.iOS18, "uint8:affine"),
    (ct.target.iOS18, "uint8@t:affine"),
    (ct.target.iOS18, "uint4@b16:affine"),
    (ct.target.iOS18, "int8@b16:affine"),
    (ct.target.iOS16, "int8"),
    (ct.target.iOS16, "int8@t"),
    (ct.target.iOS16, "uint8:affine"),
    (ct.target.iOS16, "uint8@t:affine"),
]


def _near_largest(dtype=np.float16, seed=0):
    """Weights whose every row reaches +-(the largest finite value of `dtype`), 65504 in fp16;
    every other row's largest is a few steps below it."""
    rng = np.random.default_rng(seed)
    top = float(np.finfo(dtype).max)
    w = rng.uniform(-1, 1, SHAPE) * top
    w[:, 0], w[:, 1] = top, -top
    w[::2, 0] = top * (1 - rng.integers(0, 8, SHAPE[0] // 2) * 2.0**-11)  # 65504 - 32k
    return w.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("opset, spec", QUANT_FORMS)
def test_fp16_weights_near_65504_decode_finite_within_half_a_step(opset, spec, dtype):
    """Issue finding 5: the fp16 scale rounds up (65504/127 -> 516.0) and 127 x 516 overflows:
    weights near the largest fp16 decoded to inf (fp32 weights near their largest, too)."""
    w = _near_largest(dtype)
    prog = programs.single_op("linear", dtype=dtype, shape=SHAPE, weight=w, opset=opset)
    d = _quantize(prog, spec)
    assert d.compressed, d.reason
    _assert_finite_within_half_a_step(prog, w)


@pytest.mark.parametrize("spec", [s for o, s in QUANT_FORMS if o == ct.target.iOS18])
def test_sparse_fp16_weights_near_65504_decode_finite_within_half_a_step(spec):
    """Issue finding 5, the sparse joint form (constexpr_sparse_blockwise_shift_scale)."""
    w = _near_largest(seed=1)
    prog = programs.single_op("linear", dtype=np.float16, shape=SHAPE, weight=w)
    PruneWeights(PruneConfig(parse_prune_spec("unstructured:0.5"), min_size=16))(prog)
    pruned = weight_chain(_weight_op(prog)).decode().astype(np.float16)
    d = _quantize(prog, spec)
    assert d.compressed and d.spec == f"sparse+{spec}", d.reason
    _assert_finite_within_half_a_step(prog, pruned)


@pytest.mark.parametrize("opset, spec", QUANT_FORMS)
@pytest.mark.parametrize("magnitude", [2e-6, 3e-5, 1e-3])
def test_tiny_fp16_weights_keep_their_values(opset, spec, magnitude):
    """Issue finding 6: a scale that underflows to 0 in fp16 (the `scale > 0` check ran in
    float64) decoded a layer's nonzero weights all to 0; subnormal scales lost precision."""
    rng = np.random.default_rng(7)
    w = (rng.uniform(-1, 1, SHAPE) * magnitude).astype(np.float16)
    w[:, 0] = magnitude
    assert np.count_nonzero(w)
    prog = programs.single_op("linear", dtype=np.float16, shape=SHAPE, weight=w, opset=opset)
    d = _quantize(prog, spec)
    if not d.compressed:  # left dense: it must say why
        assert d.reason and _weight_op(prog).op_type == "const"
        return
    decoded, _, _ = _decoded_and_steps(prog)
    assert np.count_nonzero(decoded) > 0
    _assert_finite_within_half_a_step(prog, w)


@pytest.mark.parametrize("spec", ["int8", "int4@b2", "uint8:affine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tiny_weights_with_min_size_0_are_left_dense_with_a_reason(spec, dtype):
    """Issue finding 10: 1x1 and 0x64 weights crashed quantize with `--min-size 0`
    ('NoneType' object has no attribute 'form')."""
    prog = programs.tiny_weights(dtype=dtype)
    pass_ = QuantizeWeights({"spec": spec, "min_size": 0})
    pass_(prog)
    prog.validate()
    rows = {d.name: d for d in pass_.report}
    ops = {o.name: o for o in prog.functions["main"].operations}
    for name, size in (("tiny", 1), ("w5", 5), ("empty", 0)):
        assert rows[name].reason == (
            f"too small to compress: {size} elements (consts of at most 9 are stored inline)"
        )
        assert ops[name].op_type == "const"
    assert rows["big"].compressed


def test_a_quantize_block_larger_than_the_axis_is_refused_before_any_work():
    """Issue finding 9: `block_size: 100000000000` leaves the weight dense with the reason
    (coremltools' compute_qparams skips a block size that does not divide the axis)."""
    _, prog = _program(np.float16, ct.target.iOS18)
    d = _quantize(prog, {"dtype": "int4", "granularity": "per_block",
                         "block_size": 100_000_000_000})  # fmt: skip
    assert d.reason == (
        "int4@b100000000000: 96 input channels are not a multiple of block_size 100000000000"
    )
    assert _weight_op(prog).op_type == "const"


def test_a_weight_no_stored_scale_fits_is_left_dense_with_the_reason(monkeypatch):
    """Issue findings 5 and 6: a weight is never stored with values that decode to inf or all
    to 0; if no scale fits a group, the weight stays dense and the report says why."""
    from milsparse.passes import quantize

    def no_fit(lo, hi, spec, dtype):
        raise quantize.UnrepresentableScaleError("1 of 64 groups have no float16 scale ...")

    monkeypatch.setattr(quantize, "fit_scales", no_fit)
    _, prog = _program(np.float16, ct.target.iOS18)
    d = _quantize(prog, "int8")
    assert not d.compressed and d.reason == "int8: 1 of 64 groups have no float16 scale ..."
    assert _weight_op(prog).op_type == "const"


def test_a_block_per_axis_of_the_weight():
    """coremltools' per-axis block_size (issue 16): `int4@b0x32` shares each 32-input-channel
    block's scale across every output channel, `int4@b1x32` is `int4@b32`; every value decodes
    within half a step of its block's scale; a block that does not divide its axis, or a rank
    other than the weight's, leaves the weight dense with the reason."""
    spec = parse_quantize_spec("int4@b0x32")
    assert spec.block_shape == (0, 32) and spec.to_string() == "int4@b0x32"
    with pytest.raises(ConfigError, match="block_shape is for per_block"):
        QuantizeSpec("int8", granularity="per_channel", block_shape=(0, 32))
    weight = programs.mlp(sizes=(64, 128, 10)).functions["main"].find_ops(op_type="const")[0]
    w = np.asarray(weight.outputs[0].val)  # fc0_weight, 128 x 64
    assert w.shape == (128, 64)
    for text, scale_shape in (("int4@b0x32", (1, 2)), ("int4@b1x32", (128, 2)),
                              ("int8@b0x0", (1, 1)), ("int8@b4x16", (32, 4))):  # fmt: skip
        prog = programs.mlp(sizes=(64, 128, 10))
        pass_ = QuantizeWeights({"spec": text, "min_size": 16, "op_names": ["fc0_weight"]})
        pass_(prog)
        (d,) = [d for d in pass_.report if d.name == "fc0_weight"]
        assert d.compressed and d.spec == text
        (op,) = prog.functions["main"].find_ops(op_type="constexpr_blockwise_shift_scale")
        scale = np.asarray(op.scale.val)
        assert scale.shape == scale_shape
        decoded = op.materialized_val_inference()
        step = np.repeat(np.repeat(scale, 128 // scale_shape[0], 0), 64 // scale_shape[1], 1)
        assert np.all(np.abs(decoded - w) <= step / 2 * (1 + 1e-6))
    for text, reason in (("int4@b0x48", "axis 1 (64) is not a multiple of its block 48"),
                         ("int4@b0x0x1", "3 block sizes for a weight of rank 2")):  # fmt: skip
        prog = programs.mlp(sizes=(64, 128, 10))
        pass_ = QuantizeWeights({"spec": text, "min_size": 16})
        pass_(prog)
        (d,) = [d for d in pass_.report if d.name == "fc0_weight"]
        assert not d.compressed and d.reason == f"{text}: {reason}"


def _ct_decoded(op):
    """coremltools' own decode of a constexpr op whose operands may be constexpr outputs."""
    operand = {}
    for name, var in op.inputs.items():
        operand[name] = var.val if var.op.op_type == "const" else _ct_decoded(var.op)
    if op.op_type == "constexpr_lut_to_dense":
        from coremltools.optimize import _utils as ct_utils

        return ct_utils.lut_to_dense(operand["indices"], operand["lut"], operand.get("vector_axis"))
    return type(op).decompress(operand["data"], operand["scale"], operand.get("offset"))


@pytest.mark.parametrize("opset", [ct.target.iOS18, ct.target.iOS26], ids=["ios18", "ios26"])
@pytest.mark.parametrize("palettize", ["lut4", "lut4@g16", "lut3x2"])
@pytest.mark.parametrize("spec", ["int8@t", "int8", "uint8@t:affine"])
def test_a_palettized_weight_gets_its_table_quantized(opset, palettize, spec):
    """Palettize, then quantize: the indices stay, the table becomes int8 (or uint8) codes and
    scales, in coremltools 9's order for the target (iOS18: shift_scale -> lut_to_dense; iOS26:
    lut_to_dense of the int8 table -> shift_scale at the weight's rank). milsparse's decode is
    coremltools', and each decoded value is its table entry within half a quantization step."""
    from milsparse.passes.palettize import PalettizeWeights

    prog = programs.mlp(sizes=(64, 128, 10), dtype=np.float16, opset=opset)
    PalettizeWeights({"spec": palettize, "min_size": 16})(prog)
    before = weight_chain(prog.functions["main"].find_ops(op_type="linear")[0].weight.op)
    old = before.decode().astype(np.float16)
    table = np.asarray(before.op.lut.val, np.float64)
    pass_ = QuantizeWeights({"spec": spec, "min_size": 16})
    pass_(prog)
    prog.validate()
    (d,) = [d for d in pass_.report if d.name == "fc0_weight"]
    assert d.compressed, d.reason
    root = prog.functions["main"].find_ops(op_type="linear")[0].weight.op
    chain = weight_chain(root)
    kinds = [op.op_type for op in chain.ops]
    if opset == ct.target.iOS18:
        assert kinds == ["constexpr_blockwise_shift_scale", "constexpr_lut_to_dense"]
        assert root.lut.op.data.dtype in (types.int8, types.uint8)
    else:
        assert kinds == ["constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"]
        assert root.data.op.lut.dtype in (types.int8, types.uint8)
        assert root.scale.rank == 2
    assert chain.label.endswith("+" + spec[:5].rstrip("@"))
    new = _ct_decoded(root)
    np.testing.assert_array_equal(chain.decode().astype(np.float16), new)
    scales = np.asarray((root.lut.op if opset == ct.target.iOS18 else root).scale.val, np.float64)
    step = float(scales.max())
    assert np.abs(new.astype(np.float64) - old).max() <= step / 2 + np.abs(table).max() * 2e-3


def test_a_table_is_quantized_per_tensor_or_per_table_and_recipes_chain_it(tmp_path, save_program):
    from milsparse.passes.palettize import PalettizeWeights

    prog = programs.mlp(sizes=(64, 128, 10), dtype=np.float16)
    PalettizeWeights({"spec": "lut4", "min_size": 16})(prog)
    pass_ = QuantizeWeights({"spec": "int4@b32", "min_size": 16})
    pass_(prog)
    (d,) = [d for d in pass_.report if d.name == "fc0_weight"]
    assert d.reason == (
        "int4@b32: a table is quantized to int8 or uint8, per tensor (@t) or per table"
    )
    model = save_program(programs.mlp(sizes=(64, 128, 10), dtype=np.float16))
    _, report = ms.compress_with_report(model, [{"palettize": "lut4"}, {"quantize": "int8@t"}])
    (row,) = [r for r in report.decisions if r.name == "fc0_weight"]
    assert row.compressed and row.spec == "lut4 + int8@t"
    assert {r.format for r in ms.inspect_model(ms.compress(
        model, [{"palettize": "lut4"}, {"quantize": "int8@t"}])).rows if r.name == "fc0_weight"} \
        == {"lut4+int8"}  # fmt: skip
