"""The verifier: honest compressions pass, damaged ones fail with the damaged output named."""

import json

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from milsparse.fixtures import programs

import milsparse as ms
from milsparse import package
from milsparse.errors import ConfigError, UnsupportedModelError
from milsparse.inputs import generate_inputs
from milsparse.metrics import Tolerances, output_metrics


def two_heads(seed=0, outlier=20.0):
    """x -> two linear heads "a" and "b"; head a's weight holds one large outlier at (5, 7)."""
    rng = np.random.default_rng(seed)
    wa = (rng.standard_normal((48, 64)) / 8).astype(np.float32)
    wa[5, 7] = outlier
    wb = (rng.standard_normal((32, 64)) / 8).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64))], opset_version=ct.target.iOS18)
    def prog(x):
        a = mb.linear(x=x, weight=mb.const(val=wa, name="a_weight"), name="a")
        b = mb.linear(x=x, weight=mb.const(val=wb, name="b_weight"), name="b")
        return a, b

    return prog


def _rebuild_sparse(model, weight_name, edit):
    """A copy of `model` whose constexpr_sparse_to_dense `weight_name` gets (mask, nonzero) from
    `edit(mask, nonzero)`; the mask is the iOS18 uint1 form, as a bool array."""
    prog = ms.load_program(model)
    func = prog.functions["main"]
    (op,) = [o for o in func.operations if o.name == weight_name]
    assert op.op_type == "constexpr_sparse_to_dense"
    mask, nonzero = edit(op.mask.val.astype(bool), op.nonzero_data.val.copy())
    with func:
        new = mb.constexpr_sparse_to_dense(
            nonzero_data=nonzero,
            mask=mask.astype(np.uint8).view(types.np_uint1_dtype),
            before_op=op,
        )
    func.replace_uses_of_var_after_op(
        anchor_op=op, old_var=op.outputs[0], new_var=new, force_replace=True
    )
    func.remove_ops([op])
    new.op.name = weight_name
    spec_version = model.get_spec().specificationVersion
    return package.program_to_model(prog, spec_version, model)


@pytest.fixture
def reference(save_program):
    return save_program(two_heads(), "reference.mlpackage")


def test_honest_20_percent_magnitude_passes(reference):
    candidate = ms.compress(reference, "unstructured:0.2")
    report = ms.verify(reference, candidate)
    assert report.passed, report
    assert [o.name for o in report.outputs] == ["a", "b"]
    for o in report.outputs:
        assert (
            o.snr_db > 15 and o.cosine > 0.98 and o.shape == ((2, 48) if o.name == "a" else (2, 32))
        )
    assert {w.name: round(w.sparsity, 3) for w in report.weights} == {
        "a_weight": 0.2,
        "b_weight": 0.2,
    }
    assert all(w.pattern == "unstructured:0.2" for w in report.weights)


def test_identical_models_have_zero_error(reference):
    report = ms.verify(reference, reference, samples=2)
    assert report.passed and report.samples == 2
    for o in report.outputs:
        # exact by construction (no error at all), not by the luck of a BLAS build
        assert o.max_abs == 0 and o.cosine == 1.0 and o.snr_db == float("inf")


def test_identical_outputs_give_exactly_cosine_one_whatever_the_values():
    """sqrt(r.r) * sqrt(c.c) can round one ulp away from r.c; identical outputs must still give
    cosine 1 and infinite SNR."""
    rng = np.random.default_rng(3)
    for size in (3, 1000, 4097):
        r = (rng.standard_normal(size) * rng.uniform(0.1, 100)).astype(np.float32)
        m = output_metrics("y", r, r.copy(), Tolerances(min_cosine=1.0))
        assert m.cosine == 1.0 and m.snr_db == float("inf") and m.rel_l2 == 0
        assert m.passed


def test_one_moved_mask_bit_fails_and_names_the_output(reference):
    """Clear the outlier's mask bit and set the next pruned one: the outlier's value lands a few
    columns over (every value between shifts by one) and output "a" moves; "b" does not."""
    candidate = ms.compress(reference, "unstructured:0.2")

    def move_outlier_bit(mask, nonzero):
        flat = mask.ravel().copy()
        p = 5 * 64 + 7
        assert flat[p]
        q = p + 1 + int(np.argmin(flat[p + 1 :]))  # the next pruned position after the outlier
        flat[p], flat[q] = False, True
        return flat.reshape(mask.shape), nonzero

    damaged = _rebuild_sparse(candidate, "a_weight", move_outlier_bit)
    report = ms.verify(reference, damaged)
    assert not report.passed
    by_name = {o.name: o for o in report.outputs}
    assert not by_name["a"].passed and by_name["b"].passed
    assert by_name["a"].snr_db < 5
    assert any(f.startswith("output a: SNR") for f in report.failures)
    assert not any(f.startswith("output b") for f in report.failures)
    assert "FAIL" in str(report) and "output a" in str(report)


def test_a_scale_multiplied_by_ten_fails(save_program, tmp_path):
    """A coremltools int8 quantization (iOS18 blockwise shift-scale) verifies; the same model
    with one layer's scale multiplied by 10 fails on the output it feeds."""
    reference = save_program(programs.mlp(sizes=(64, 128, 128, 10)), "mlp.mlpackage")
    config = ct.optimize.coreml.OptimizationConfig(
        global_config=ct.optimize.coreml.OpLinearQuantizerConfig(weight_threshold=0)
    )
    dense = ct.models.MLModel(str(reference), skip_model_load=True)
    quantized = ct.optimize.coreml.linear_quantize_weights(dense, config)
    assert ms.verify(reference, quantized).passed

    prog = ms.load_program(quantized)
    func = prog.functions["main"]
    ops = [o for o in func.operations if o.op_type == "constexpr_blockwise_shift_scale"]
    assert ops, [o.op_type for o in func.operations]
    op = ops[0]
    with func:
        new = mb.constexpr_blockwise_shift_scale(
            data=op.data.val,
            scale=op.scale.val * 10,
            offset=None if op.offset is None else op.offset.val,
            before_op=op,
        )
    func.replace_uses_of_var_after_op(
        anchor_op=op, old_var=op.outputs[0], new_var=new, force_replace=True
    )
    func.remove_ops([op])
    damaged = package.program_to_model(prog, quantized.get_spec().specificationVersion, quantized)
    report = ms.verify(reference, damaged)
    assert not report.passed
    (out,) = report.outputs
    assert out.failures and report.failures[0].startswith(f"output {out.name}:")


@pytest.mark.parametrize(
    ("spec", "symptom"),
    [("2:4", "fewer than 2 zeros"), ("block4:0.5", "all-zero blocks, expected at least")],
)
def test_broken_structured_pattern_is_reported(save_program, spec, symptom):
    reference = save_program(programs.mlp(sizes=(64, 128, 128, 10)), "mlp.mlpackage")
    candidate = ms.compress(reference, spec)
    # random weights lose much at 50%; only the pattern is under test here
    tol = Tolerances(min_snr_db=None, min_cosine=None)
    honest = ms.verify(reference, candidate, tolerances=tol)
    assert honest.passed
    checks = {w.name: w for w in honest.weights}
    assert checks["fc0_weight"].pattern == spec and checks["fc0_weight"].pattern_holds

    def fill_first_pruned(mask, nonzero):
        """Give the first pruned position a tiny nonzero: its group (or block) loses a zero."""
        flat = mask.ravel().copy()
        q = int(np.argmin(flat))
        rank = int(flat[:q].sum())
        flat[q] = True
        return flat.reshape(mask.shape), np.insert(nonzero, rank, nonzero.dtype.type(1e-4))

    damaged = _rebuild_sparse(candidate, "fc0_weight", fill_first_pruned)
    report = ms.verify(reference, damaged, tolerances=tol)
    for before, after in zip(honest.outputs, report.outputs, strict=True):
        assert after.passed and abs(after.snr_db - before.snr_db) < 0.01  # barely moved...
    assert not report.passed  # ...but the declared pattern no longer holds
    check = {w.name: w for w in report.weights}["fc0_weight"]
    assert check.pattern_holds is False and symptom in check.detail
    assert report.failures == [f"weight fc0_weight: {spec} pattern broken ({check.detail})"]
    assert {w.name: w.pattern_holds for w in report.weights}["fc1_weight"] is True


def test_inputs_as_dict_list_and_npz(reference, tmp_path):
    candidate = ms.compress(reference, "unstructured:0.2")
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(3)]
    one = ms.verify(reference, candidate, feeds[0])
    many = ms.verify(reference, candidate, feeds)
    np.savez(tmp_path / "x.npz", x=feeds[0]["x"])
    from_file = ms.verify(reference, candidate, tmp_path / "x.npz")
    assert (one.samples, many.samples, from_file.samples) == (1, 3, 1)
    assert one.to_dict()["outputs"] == from_file.to_dict()["outputs"]
    with pytest.raises(ConfigError, match="missing input 'x'"):
        ms.verify(reference, candidate, {"y": feeds[0]["x"]})
    with pytest.raises(ConfigError, match="empty list"):
        ms.verify(reference, candidate, [])
    with pytest.raises(ConfigError, match="shape"):
        ms.verify(reference, candidate, {"x": np.zeros((3, 64), np.float32)})
    (tmp_path / "bad.npz").write_text("not an npz")
    with pytest.raises(ConfigError, match="not a .npz archive"):
        ms.verify(reference, candidate, tmp_path / "bad.npz")


def test_generated_integer_inputs_stay_inside_the_gathered_table(save_program):
    path = save_program(programs.shared_weight(vocab=7))
    model = ct.models.MLModel(str(path), skip_model_load=True)
    feeds = generate_inputs(model, ms.load_program(model), samples=20, seed=1)
    ids = np.stack([f["ids"] for f in feeds])
    assert ids.dtype == np.int32 and ids.shape == (20, 1, 5)
    assert ids.min() >= 0 and ids.max() == 6  # the whole table is reached, nothing past it
    assert ms.verify(path, ms.compress(path, "unstructured:0.2")).passed


def test_models_with_different_interfaces_are_refused(reference, save_program):
    other = save_program(programs.mlp(), "other.mlpackage")
    with pytest.raises(UnsupportedModelError, match="different outputs"):
        ms.verify(reference, other)


def test_report_json_round_trips_and_tolerances_apply(reference):
    candidate = ms.compress(reference, "unstructured:0.5")
    strict = ms.verify(reference, candidate, tolerances=Tolerances(min_snr_db=60))
    assert not strict.passed
    loose = ms.verify(reference, candidate, tolerances=Tolerances(min_snr_db=None, min_cosine=0))
    assert loose.passed
    data = json.loads(strict.to_json())
    assert data["passed"] is False
    assert data["tolerances"]["min_snr_db"] == 60
    assert {o["name"] for o in data["outputs"]} == {"a", "b"}
    assert set(data["outputs"][0]) >= {
        "max_abs", "mean_abs", "rel_l2", "snr_db", "psnr_db", "cosine", "passed", "shape",
    }  # fmt: skip
    assert data["failures"] == strict.failures


def test_output_metrics_by_hand():
    ref = np.array([3.0, 4.0])
    m = output_metrics("y", ref, np.array([3.0, 4.5]), Tolerances())
    assert m.max_abs == pytest.approx(0.5) and m.mean_abs == pytest.approx(0.25)
    assert m.rel_l2 == pytest.approx(0.1)
    assert m.snr_db == pytest.approx(20.0)  # 25 / 0.25
    assert m.psnr_db == pytest.approx(10 * np.log10(16 / 0.125))
    assert m.cosine == pytest.approx((9 + 18) / (5 * np.hypot(3, 4.5)))
    bad = output_metrics("y", ref, np.array([np.nan, 4.0]), Tolerances())
    assert "non-finite values" in bad.failures
    wrong = output_metrics("y", ref, np.zeros(3), Tolerances())
    assert not wrong.passed and "shape" in wrong.failures[0]


def _torch_convert(module, inputs, example):
    torch = pytest.importorskip("torch", reason="the test extra installs torch")
    torch.manual_seed(0)
    traced = torch.jit.trace(module.eval(), example, check_trace=False)
    return ct.convert(
        traced,
        inputs=inputs,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )


@pytest.mark.parametrize("flexible", ["range", "enumerated"])
def test_flexible_shapes_use_the_declared_default(flexible):
    torch = pytest.importorskip("torch", reason="the test extra installs torch")
    from milsparse.fixtures import torch_models

    shape = (
        (1, ct.RangeDim(2, 16, default=6), 64)
        if flexible == "range"
        else ct.EnumeratedShapes(shapes=[(1, 4, 64), (1, 6, 64)], default=(1, 6, 64))
    )
    module = torch_models.TinyEncoder()
    model = _torch_convert(module, [ct.TensorType(name="x", shape=shape)], torch.randn(1, 8, 64))
    (feed,) = generate_inputs(model, ms.load_program(model), samples=1)
    assert feed["x"].shape == (1, 6, 64)
    report = ms.verify(model, ms.compress(model, "unstructured:0.2"))
    assert report.passed and report.outputs[0].shape == (1, 6, 64)
    # and the interpreter runs any length the range allows
    x = torch.randn(1, 3, 64)
    (got,) = ms.evaluate(model, {"x": x.numpy()}).values()
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_image_inputs_are_generated_in_pixel_range():
    torch = pytest.importorskip("torch", reason="the test extra installs torch")
    from milsparse.fixtures import torch_models

    image = ct.ImageType(name="image", shape=(1, 3, 16, 16), scale=1 / 255)
    model = _torch_convert(torch_models.ConvBNNet(), [image], torch.randn(1, 3, 16, 16))
    feeds = generate_inputs(model, ms.load_program(model), samples=3)
    pixels = np.stack([f["image"] for f in feeds])
    assert pixels.shape == (3, 1, 3, 16, 16) and 0 <= pixels.min() and pixels.max() <= 255
    assert pixels.max() > 200  # the whole range, not [0, 1)
    assert ms.verify(model, ms.compress(model, "unstructured:0.2")).passed


@pytest.mark.parametrize("opset", [ct.target.iOS16, ct.target.iOS18], ids=["ios16", "ios18"])
@pytest.mark.parametrize("spec", ["2:4", "block4:0.5", "block2@in:0.25", "3:8@out"])
def test_structured_patterns_verify_on_both_mask_forms(save_program, opset, spec):
    reference = save_program(programs.mlp(sizes=(64, 128, 128, 10), opset=opset))
    candidate = ms.compress(reference, spec)
    report = ms.verify(reference, candidate, tolerances=Tolerances(None, None), samples=1)
    checks = {w.name: w for w in report.weights}
    assert set(checks) == {"fc0_weight", "fc1_weight"}
    for check in checks.values():
        assert check.format.startswith("sparse") and check.pattern == spec
        assert check.pattern_holds is True, check.detail
    assert report.passed


def _masked_bert(precision=ct.precision.FLOAT16):
    torch = pytest.importorskip("torch", reason="the test extra installs torch")
    from milsparse.fixtures import torch_models

    torch.manual_seed(0)
    module = torch_models.MaskedBert().eval()
    ids, mask = module.example()
    traced = torch.jit.trace(module, (ids, mask), check_trace=False)
    inputs = [
        ct.TensorType(name="ids", shape=tuple(ids.shape), dtype=np.int32),
        ct.TensorType(name="mask", shape=tuple(mask.shape), dtype=np.int32),
    ]
    model = ct.convert(
        traced,
        inputs=inputs,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=precision,
        skip_model_load=True,
    )
    return module, model


def test_generated_inputs_for_a_bert_style_model_with_an_int_attention_mask():
    """ids index the embedding table; the mask feeds (1 - mask) * -10000 in fp16, where a
    value of 10 overflows: it must be generated as 0/1, and the model verifies against itself."""
    module, model = _masked_bert()
    prog = ms.load_program(model)
    feeds = generate_inputs(model, prog, samples=16, seed=2)
    ids = np.stack([f["ids"] for f in feeds])
    mask = np.stack([f["mask"] for f in feeds])
    assert ids.min() >= 0 and ids.max() < module.tok.num_embeddings and ids.max() > 50
    assert set(np.unique(mask)) == {0, 1}
    for feed in feeds[:2]:
        (out,) = ms.evaluate(model, feed).values()
        assert np.all(np.isfinite(out))
    report = ms.verify(model, model)
    assert report.passed, report
    assert all(o.cosine == 1.0 for o in report.outputs)
    assert ms.verify(model, ms.compress(model, "unstructured:0.1")).passed


def _overflowing(save_program):
    """exp(100 x): finite for inputs near zero, inf for the standard normal samples verify
    generates."""

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 16))], opset_version=ct.target.iOS18)
    def prog(x):
        w = mb.const(val=np.eye(16, dtype=np.float32), name="w")
        return mb.exp(x=mb.mul(x=mb.linear(x=x, weight=w), y=100.0), name="y")

    return save_program(prog)


def test_a_reference_not_finite_on_generated_inputs_is_a_clear_error(save_program, tmp_path):
    from milsparse.cli import main

    path = _overflowing(save_program)
    with pytest.raises(ConfigError, match=r"not finite .* generated input sample 0.*--inputs"):
        ms.verify(path, path)
    assert main(["verify", str(path), str(path)]) == 2  # a user error, not a FAIL (1)
    np.savez(tmp_path / "small.npz", x=np.full((2, 16), 0.01, np.float32))
    assert ms.verify(path, path, tmp_path / "small.npz").passed
    with pytest.raises(ConfigError, match="not finite .* input sample 0; verify needs"):
        ms.verify(path, path, {"x": np.full((2, 16), 9.0, np.float32)})


def test_pattern_checks_reach_weights_inside_control_flow(save_program):
    path = save_program(programs.branches(64))
    candidate = ms.compress(path, "2:4")
    report = ms.verify(path, candidate, tolerances=Tolerances(None, None), samples=1)
    checks = {w.name: w for w in report.weights}
    assert set(checks) == {"w_then", "w_else"}  # one branch ran, both are checked
    assert all(c.pattern == "2:4" and c.pattern_holds for c in checks.values())


@pytest.mark.parametrize(
    "tolerances",
    [
        {"min_snr_db": float("nan")},
        {"min_cosine": float("nan")},
        {"min_cosine": 2},
        {"min_cosine": -1.5},
        {"max_rel_l2": -1},
        {"max_abs": float("inf")},
        {"min_snr_db": True},
        {"min_snr_db": "15"},
    ],
)
def test_tolerances_that_would_switch_checks_off_are_refused(tolerances):
    with pytest.raises(ConfigError):
        Tolerances(**tolerances)


def test_verify_refuses_zero_samples_and_negative_seeds(reference):
    with pytest.raises(ConfigError, match="samples must be an integer >= 1"):
        ms.verify(reference, reference, samples=0)
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        ms.verify(reference, reference, seed=-1)


def test_input_files_and_dicts_are_checked(reference, tmp_path):
    x = np.ones((2, 64), np.float32)
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(ConfigError, match=r"a single array \(.npy\), not a .npz archive"):
        ms.verify(reference, reference, tmp_path / "x.npy")
    np.savez(tmp_path / "s.npz", x=np.full((2, 64), "a"))
    with pytest.raises(ConfigError, match="'x' is a string array"):
        ms.verify(reference, reference, tmp_path / "s.npz")
    with pytest.raises(ConfigError, match="'x' is a complex array"):
        ms.verify(reference, reference, {"x": x + 1j})
    with pytest.raises(ConfigError, match=r"not inputs of the model: \['y'\]"):
        ms.verify(reference, reference, {"x": x, "y": x})
    with pytest.raises(ConfigError, match="input sample 1: missing input 'x'"):
        ms.verify(reference, reference, [{"x": x}, {}])
    np.savez(tmp_path / "wrong.npz", x=np.ones((3, 7), np.float32))
    with pytest.raises(
        ConfigError, match=r"has shape \(3, 7\); the input is \(2, 64\), so an entry"
    ):
        ms.verify(reference, reference, tmp_path / "wrong.npz")


def test_one_npz_serves_calibration_and_verify(save_program, tmp_path, capsys):
    """Issue 15: `--calibration` and `verify --inputs` read the same file (a leading sample
    axis); an entry of the input's own rank is one sample; verify says how many it compared."""
    from milsparse.cli import main

    path = save_program(programs.mlp(sizes=(64, 256, 10)))
    shape = tuple(ms.load_program(path).functions["main"].inputs["x"].shape)
    x = np.random.default_rng(0).standard_normal((5, *shape)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    np.savez(tmp_path / "one.npz", x=x[0])
    out = tmp_path / "wanda.mlpackage"
    args = ["compress", str(path), "-o", str(out), "--prune", "2:4", "--criterion", "wanda"]
    assert main([*args, "--calibration", str(tmp_path / "cal.npz"), "--min-size", "512"]) == 0
    capsys.readouterr()
    assert main(["verify", str(path), str(out), "--inputs", str(tmp_path / "cal.npz"),
                 "--json"]) in (0, 1)  # fmt: skip
    assert json.loads(capsys.readouterr().out)["samples"] == 5
    assert ms.verify(path, out, tmp_path / "one.npz").samples == 1
    many = ms.verify(path, out, tmp_path / "cal.npz")
    each = [ms.verify(path, out, {"x": sample}) for sample in x]
    assert many.samples == 5 and all(r.samples == 1 for r in each)
    worst = max(r.outputs[0].max_abs for r in each)
    assert many.outputs[0].max_abs == pytest.approx(worst)


def test_integer_inputs_take_whole_numbers(save_program):
    """A float 1.5 for an int32 input was truncated to 1 without a word."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4)

    @mb.program(
        input_specs=[mb.TensorSpec(shape=(3,), dtype=types.int32)], opset_version=ct.target.iOS18
    )
    def prog(ids):
        return mb.gather(x=mb.const(val=table), indices=ids, axis=0, name="rows")

    path = save_program(prog)
    assert ms.evaluate(path, {"ids": np.array([1.0, 2.0, 3.0])})["rows"][0, 0] == 4
    with pytest.raises(ConfigError, match="holds 1.5; the input is int32 and takes whole"):
        ms.evaluate(path, {"ids": np.array([1.5, 2.0, 3.0])})


def _argmax_head(save_program):
    """x -> linear -> argmax (int32 "label") and the logits ("logits"). With positive inputs
    row 8 (64 x 0.1) beats row 9 (one 5.0, the rest 0.001); channel-scope pruning at 50% halves
    row 8 and keeps row 9's 5.0, so the label moves from 8 to 9 on every sample."""
    w = np.zeros((10, 64), np.float32)
    w[8] = 0.1
    w[9] = 0.001
    w[9, 0] = 5.0

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 64))], opset_version=ct.target.iOS18)
    def prog(x):
        logits = mb.linear(x=x, weight=mb.const(val=w, name="head_weight"), name="logits")
        return logits, mb.reduce_argmax(x=logits, axis=-1, name="label")

    return save_program(prog)


def test_integer_outputs_are_compared_exactly(save_program):
    """Finding 7: an argmax wrong on every sample passed (SNR 35.9 dB, cosine 0.99989): integer
    outputs are compared value by value, with a match rate and `max_mismatch` (default 0)."""
    path = _argmax_head(save_program)
    candidate = ms.compress(path, {"spec": "unstructured@channel:0.5", "min_size": 1})
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.uniform(0.9, 1.1, (2, 64)).astype(np.float32)} for _ in range(4)]
    flipped = ms.evaluate(candidate, feeds[0])["label"]
    assert ms.evaluate(path, feeds[0])["label"].tolist() == [8, 8] and flipped.tolist() == [9, 9]
    loose = Tolerances(min_snr_db=None, min_cosine=None)  # the logits may move: only labels count
    report = ms.verify(path, candidate, feeds, tolerances=loose)
    label = {o.name: o for o in report.outputs}["label"]
    assert label.exact and label.mismatches == 8 and label.match_rate == 0.0
    assert not report.passed
    assert report.failures == ["output label: 8 of 8 values differ (match rate 0; max_mismatch 0)"]
    assert label.snr_db is None and label.cosine is None  # float metrics do not apply
    data = report.to_dict()["outputs"]
    assert {o["name"]: o["match_rate"] for o in data} == {"logits": None, "label": 0.0}
    assert "match" in str(report) and "0.0000 (8 differ)" in str(report)
    anything = Tolerances(min_snr_db=None, min_cosine=None, max_mismatch=1)
    assert ms.verify(path, candidate, feeds, tolerances=anything).passed
    assert ms.verify(path, path, feeds).passed  # identical labels: match rate 1


def test_bool_outputs_and_max_mismatch_by_hand():
    """Finding 7: bool outputs too; `max_mismatch` is the fraction of values allowed to differ."""
    ref = np.array([True, False, True, True])
    cand = np.array([True, True, True, True])
    m = output_metrics("mask", ref, cand, Tolerances())
    assert m.exact and m.mismatches == 1 and m.match_rate == 0.75 and not m.passed
    assert output_metrics("mask", ref, cand, Tolerances(max_mismatch=0.25)).passed
    assert not output_metrics("mask", ref, cand, Tolerances(max_mismatch=0.2)).passed
    ids = np.array([1000000, 7], np.int64)  # large ids would give a high SNR as floats
    assert not output_metrics("ids", ids, ids + np.array([1, 0]), Tolerances()).passed
    for bad in (-0.1, 1.5, float("nan"), "0"):
        with pytest.raises(ConfigError, match="max_mismatch"):
            Tolerances(max_mismatch=bad)


def test_cli_max_mismatch(save_program, tmp_path, capsys):
    """Finding 7: `--max-mismatch F` sets the tolerance; JSON reports the match rate."""
    from milsparse.cli import main

    path = _argmax_head(save_program)
    candidate = tmp_path / "c.mlpackage"
    ms.compress(path, {"spec": "unstructured@channel:0.5", "min_size": 1}, output=candidate)
    np.savez(tmp_path / "in.npz", x=np.ones((2, 64), np.float32))
    base = ["verify", str(path), str(candidate), "--inputs", str(tmp_path / "in.npz"),
            "--min-snr", "-100", "--min-cosine", "-1", "--json"]  # fmt: skip
    assert main(base) == 1
    label = [o for o in json.loads(capsys.readouterr().out)["outputs"] if o["name"] == "label"]
    assert label[0]["match_rate"] == 0.0 and label[0]["mismatches"] == 2
    assert main([*base, "--max-mismatch", "1"]) == 0
    capsys.readouterr()
    assert main([*base, "--max-mismatch", "2"]) == 2
    assert "max_mismatch" in capsys.readouterr().err


def test_raise_if_failed_turns_a_failed_report_into_a_verification_error(save_program):
    model = save_program(programs.mlp(sizes=(64, 128, 10), dtype=np.float16))
    small = ms.compress(model, {"prune": {"spec": "unstructured:0.6", "min_size": 16}})
    passed = ms.verify(model, model)
    assert passed.raise_if_failed() is passed
    strict = ms.Tolerances(min_snr_db=80.0, min_cosine=0.999999)
    failed = ms.verify(model, small, tolerances=strict)
    assert not failed.passed
    with pytest.raises(ms.VerificationError, match=r"verification failed on \d+ checks?: output "):
        failed.raise_if_failed()
