"""The numpy reference interpreter against torch: every converted fixture, fp32 and fp16."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from hypothesis import given
from hypothesis.extra import numpy as hnp

torch = pytest.importorskip("torch", reason="the test extra installs torch")

import coremltools as ct  # noqa: E402
from milsparse.fixtures import torch_models  # noqa: E402
from milsparse.ir.interpreter import evaluate_program  # noqa: E402

import milsparse as ms  # noqa: E402
from milsparse.errors import ConfigError, UnsupportedOpError  # noqa: E402

PRECISIONS = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def converted():
    """(module class, precision) -> (torch module, MLModel); converted once per test module."""
    cache = {}

    def get(cls, precision):
        if (cls, precision) not in cache:
            torch.manual_seed(0)
            module = cls().eval()
            cache[cls, precision] = (
                module,
                torch_models.convert(module, precision=PRECISIONS[precision]),
            )
        return cache[cls, precision]

    return get


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("cls", torch_models.ALL_MODULES, ids=lambda c: c.__name__)
def test_interpreter_matches_torch(converted, cls, precision):
    module, mlmodel = converted(cls, precision)
    prog = mlmodel._mil_program
    # seed 1: a different input from the one the module was traced with
    for seed in (0, 1):
        x = torch_models.example_input(module, seed)
        with torch.no_grad():
            expected = module(x)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        ours = ms.evaluate(mlmodel, {"x": x.numpy()})
        names = [v.name for v in prog.functions["main"].outputs]
        assert list(ours) == names
        assert len(names) == len(expected)
        for name, want in zip(names, expected, strict=True):
            got, want = ours[name], want.numpy()
            assert got.shape == want.shape, name
            if precision == "fp32":
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)
            else:
                assert got.dtype == np.float16  # computed in fp32, rounded at op boundaries
                assert _cosine(got, want) >= 0.999, name


def test_unsupported_ops_are_all_named_before_running():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x):
        noise = mb.random_uniform(shape=np.array([2, 3], np.int32))
        y = mb.add(x=mb.relu(x=x), y=noise)
        column = mb.slice_by_size(x=y, begin=[0, 0], size=[2, 1])
        boxes = mb.expand_dims(x=mb.concat(values=[y, column], axis=1), axes=[0])
        scores = mb.expand_dims(x=y, axes=[0])
        nms = mb.non_maximum_suppression(
            boxes=boxes, scores=scores, iou_threshold=0.5, score_threshold=0.1, max_boxes=2
        )
        return nms[0]

    with pytest.raises(UnsupportedOpError) as info:
        evaluate_program(prog, {"x": np.zeros((2, 3), np.float32)})
    message = str(info.value)
    for op_type in ("random_uniform", "non_maximum_suppression"):
        assert op_type in message


def test_missing_or_misshapen_inputs_are_config_errors():
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))])
    def prog(x):
        return mb.relu(x=x)

    with pytest.raises(ConfigError, match="missing input 'x'"):
        evaluate_program(prog, {"y": np.zeros((2, 3), np.float32)})
    with pytest.raises(ConfigError, match=r"shape \(3, 2\)"):
        evaluate_program(prog, {"x": np.zeros((3, 2), np.float32)})


def test_constexpr_cache_decodes_each_weight_once(monkeypatch):
    from milsparse.ir import interpreter

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    w[w % 3 == 0] = 0

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS18)
    def prog(x):
        mask = (w != 0).astype(np.uint8).view(types.np_uint1_dtype)
        dense = mb.constexpr_sparse_to_dense(nonzero_data=w[w != 0], mask=mask)
        return mb.linear(x=x, weight=dense)

    calls = []
    original = interpreter.KERNELS["constexpr_sparse_to_dense"]
    monkeypatch.setitem(
        interpreter.KERNELS,
        "constexpr_sparse_to_dense",
        lambda *a: calls.append(1) or original(*a),
    )
    cache = {}
    x = np.ones((1, 4), np.float32)
    first = evaluate_program(prog, {"x": x}, cache=cache)
    second = evaluate_program(prog, {"x": 2 * x}, cache=cache)
    assert len(calls) == 1
    (name,) = first
    np.testing.assert_allclose(first[name], x @ w.T)
    np.testing.assert_allclose(second[name], 2 * x @ w.T)


# -- single ops the torch fixtures do not reach, against torch.nn.functional ----------------


def _run_single(build, x):
    prog = mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)(
        build
    )
    (out,) = evaluate_program(prog, {"x": x}).values()
    return out


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
def test_conv_same_padding_with_groups(stride, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 9, 7)).astype(np.float32)
    w = rng.standard_normal((9, 2, 3, 3)).astype(np.float32)
    b = rng.standard_normal(9).astype(np.float32)

    def build(x):
        return mb.conv(
            x=x, weight=w, bias=b, strides=[stride] * 2, dilations=[dilation] * 2,
            pad_type="same", groups=3,
        )  # fmt: skip

    got = _run_single(build, x)
    # Core ML "same": output = ceil(in / stride), the extra pad goes at the end
    pads = []
    for size in (9, 7):
        out = -(-size // stride)
        total = max((out - 1) * stride + dilation * 2 + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    padded = torch.nn.functional.pad(
        torch.from_numpy(x), (pads[1][0], pads[1][1], pads[0][0], pads[0][1])
    )
    want = torch.nn.functional.conv2d(
        padded, torch.from_numpy(w), torch.from_numpy(b), stride, 0, dilation, groups=3
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "channels, size, stride, pad_type",
    [
        (4, 12, 1, "same"),  # depthwise, NCHW taps (few channels, wide maps)
        (32, 7, 2, "same"),  # depthwise, channels-last taps (channels >= 2 * output width)
        (24, 5, 1, "valid"),
        (24, 9, 2, "custom"),
    ],
)
@pytest.mark.parametrize("dilation", [1, 2])
def test_depthwise_conv_both_layouts(channels, size, stride, pad_type, dilation):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, channels, size, size + 1)).astype(np.float32)
    w = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    pad = [1, 2, 0, 1] if pad_type == "custom" else None

    def build(x):
        kwargs = {"pad": pad} if pad else {}
        return mb.conv(x=x, weight=w, bias=b, strides=[stride] * 2, dilations=[dilation] * 2,
                       pad_type=pad_type, groups=channels, **kwargs)  # fmt: skip

    got = _run_single(build, x)
    tx = torch.from_numpy(x)
    if pad_type == "same":
        pads = []
        for n in (size, size + 1):
            total = max((-(-n // stride) - 1) * stride + 2 * dilation + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        tx = torch.nn.functional.pad(tx, (pads[2], pads[3], pads[0], pads[1]))
    elif pad:
        tx = torch.nn.functional.pad(tx, (pad[2], pad[3], pad[0], pad[1]))
    want = torch.nn.functional.conv2d(
        tx, torch.from_numpy(w), torch.from_numpy(b), stride, 0, dilation, groups=channels
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 4])
def test_pointwise_conv_and_linear_over_leading_dims(groups):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 5, 6)).astype(np.float32)
    w = rng.standard_normal((12, 8 // groups, 1, 1)).astype(np.float32)
    got = _run_single(lambda x: mb.conv(x=x, weight=w, groups=groups), x)
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), groups=groups)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    lw = rng.standard_normal((7, 6)).astype(np.float32)
    lb = rng.standard_normal(7).astype(np.float32)
    got = _run_single(lambda x: mb.linear(x=x, weight=lw, bias=lb), x)
    np.testing.assert_allclose(got, x @ lw.T + lb, rtol=1e-4, atol=1e-5)
    my = rng.standard_normal((6, 3)).astype(np.float32)
    got = _run_single(lambda x: mb.matmul(x=x, y=my), x)
    np.testing.assert_allclose(got, x @ my, rtol=1e-4, atol=1e-5)


def test_erf_and_exact_gelu_at_float32_accuracy():
    import math

    from milsparse.ir.kernels_math import erf, gelu_exact

    x = np.concatenate([np.linspace(-9, 9, 200_001), [0.0, -0.0, 1e-30, -1e-8, 3.92, 4.5]])
    x = x.astype(np.float32)
    want = np.array([math.erf(float(v)) for v in x])
    got = erf(x)
    assert got.dtype == np.float32
    assert np.max(np.abs(got - want)) < 4e-7
    tiny = np.abs(x) < 1e-3
    assert np.max(np.abs(got[tiny] - want[tiny]) / np.maximum(np.abs(want[tiny]), 1e-38)) < 4e-7
    assert np.all(np.abs(got) <= 1)
    gelu = 0.5 * x.astype(np.float64) * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))
    assert np.max(np.abs(gelu_exact(x) - gelu) / np.maximum(np.abs(x), 1)) < 4e-7


def test_max_pool_and_batch_norm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    mean, gamma, beta = rng.standard_normal((3, 3)).astype(np.float32)
    var = rng.uniform(0.5, 2, 3).astype(np.float32)

    def build(x):
        y = mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta, epsilon=1e-3)
        return mb.max_pool(x=y, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom",
                           pad=[1, 1, 1, 1])  # fmt: skip

    got = _run_single(build, x)
    t = torch.nn.functional.batch_norm(
        torch.from_numpy(x), *map(torch.from_numpy, (mean, var, gamma, beta)), eps=1e-3
    )
    want = torch.nn.functional.max_pool2d(t, 3, 2, padding=1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_conv_transpose_groups_and_output_padding():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 5, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)  # [C_in, C_out / groups, kh, kw]

    def build(x):
        return mb.conv_transpose(
            x=x, weight=w, strides=[2, 3], pad_type="custom", pad=[1, 1, 0, 0], groups=2,
            output_shape=[1, 6, 10, 17],
        )  # fmt: skip

    got = _run_single(build, x)
    want = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(w), stride=(2, 3), padding=(1, 0), groups=2,
        output_padding=(1, 0),
    )  # fmt: skip
    assert got.shape == tuple(want.shape)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


@given(hnp.arrays(np.uint32, hnp.array_shapes(max_dims=2, max_side=64)))
def test_round_to_fp16_equals_numpy_cast_on_any_bits(bits):
    from milsparse.ir.fp16 import ROUND_BY_CAST_BELOW, round_to_fp16

    # padded past the size where numpy's cast takes over, so the bit path is the one tested
    padded = np.concatenate([bits.ravel(), np.zeros(ROUND_BY_CAST_BELOW, np.uint32)])
    x = padded.view(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    got = round_to_fp16(x)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all()


def test_round_to_fp16_edges():
    from milsparse.ir.fp16 import ROUND_BY_CAST_BELOW, round_to_fp16

    edges = np.array(
        [0.0, -0.0, 2**-24, 2**-25, 3 * 2**-26, 2**-14, 2**-14 - 2**-25, 65504, 65519.99,
         65520, -65520, np.inf, -np.inf, np.nan, 1 + 2**-11, 1 + 3 * 2**-11, 2048 + 1],
        np.float32,
    )  # fmt: skip
    for x in (edges, np.resize(edges, ROUND_BY_CAST_BELOW + 1)):  # both paths
        with np.errstate(over="ignore"):
            want = x.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(round_to_fp16(x), want)
        assert np.signbit(round_to_fp16(x)[1])
