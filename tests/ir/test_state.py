"""iOS18 stateful models: the interpreter's state kernels, and pruning one with its states."""

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from milsparse.fixtures import programs
from milsparse.ir.interpreter import evaluate_program

import milsparse as ms
from milsparse.cli import main

D, T = 64, 8  # model width, cache length


def _kv_cache_program(seed=0):
    """One decode step of attention over a KV cache held in two states: the new key and value
    are written at position `pos` (slice_update), the states updated, and the query attends
    over the whole cache."""
    rng = np.random.default_rng(seed)
    w = {n: programs.trained_like(rng, (D, D), np.float16) for n in ("q", "k", "v", "o")}

    @mb.program(
        input_specs=[
            mb.StateTensorSpec((1, T, D), dtype=types.fp16),
            mb.StateTensorSpec((1, T, D), dtype=types.fp16),
            mb.TensorSpec((1, 1, D), dtype=types.fp16),
            mb.TensorSpec((1,), dtype=types.int32),
        ],
        opset_version=ct.target.iOS18,
    )
    def prog(k_cache, v_cache, x, pos):
        proj = {n: mb.linear(x=x, weight=mb.const(val=w[n], name=f"{n}_weight"), name=n)
                for n in ("q", "k", "v")}  # fmt: skip
        zero = np.array([0], np.int32)
        begin = mb.concat(values=[zero, pos, zero], axis=0)
        one, width = np.array([1], np.int32), np.array([D], np.int32)
        end = mb.concat(values=[one, mb.add(x=pos, y=1), width], axis=0)
        for name, state in (("k", k_cache), ("v", v_cache)):
            cache = mb.read_state(input=state)
            cache = mb.slice_update(x=cache, update=proj[name], begin=begin, end=end)
            mb.coreml_update_state(state=state, value=cache)
        keys, values = mb.read_state(input=k_cache), mb.read_state(input=v_cache)
        scores = mb.matmul(x=proj["q"], y=keys, transpose_y=True)
        attn = mb.softmax(x=mb.mul(x=scores, y=np.float16(1 / np.sqrt(D))), axis=-1)
        out = mb.linear(x=mb.matmul(x=attn, y=values), weight=mb.const(val=w["o"], name="o_weight"))
        return mb.cast(x=out, dtype="fp32", name="y")

    return prog


def _numpy_step(prog, x, pos, k0, v0):
    weights = {op.name: op.outputs[0].val.astype(np.float32)
               for op in prog.functions["main"].operations if op.op_type == "const"
               and op.name.endswith("_weight")}  # fmt: skip
    proj = {n: x.astype(np.float32) @ weights[f"{n}_weight"].T for n in "qkv"}
    k, v = k0.astype(np.float32).copy(), v0.astype(np.float32).copy()
    k[:, pos], v[:, pos] = proj["k"][:, 0], proj["v"][:, 0]
    scores = proj["q"] @ np.swapaxes(k, -1, -2) / np.sqrt(D)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    return (attn @ v) @ weights["o_weight"].T


def test_states_start_at_zeros_or_given_and_reads_see_updates():
    prog = _kv_cache_program()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 1, D)).astype(np.float16)
    for pos, given in ((0, False), (5, True)):
        k0 = (
            rng.standard_normal((1, T, D)).astype(np.float16)
            if given
            else np.zeros((1, T, D), np.float16)
        )
        v0 = (
            rng.standard_normal((1, T, D)).astype(np.float16)
            if given
            else np.zeros((1, T, D), np.float16)
        )
        feed = {"x": x, "pos": np.array([pos], np.int32)}
        if given:
            feed |= {"k_cache": k0, "v_cache": v0}
        (y,) = evaluate_program(prog, feed).values()
        expected = _numpy_step(prog, x, pos, k0, v0)
        cos = float((y.ravel() @ expected.ravel()) / (np.linalg.norm(y) * np.linalg.norm(expected)))
        assert cos > 0.999, (pos, given, cos)


@pytest.mark.parametrize(
    "begin, end, squeeze, update_shape",
    [([0, 2, 0], [1, 3, 16], [0, 0, 0], (1, 1, 16)), ([0, 2, 4], [1, 6, 12], [0, 0, 0], (1, 4, 8)),
     ([0, 3, 0], [1, 4, 16], [0, 1, 0], (1, 16))],
)  # fmt: skip
def test_slice_update_writes_the_region_slice_by_index_reads(begin, end, squeeze, update_shape):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, 8, 16)).astype(np.float32)
    update = rng.standard_normal(update_shape).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec((1, 8, 16)), mb.TensorSpec(update_shape)],
                opset_version=ct.target.iOS18)  # fmt: skip
    def prog(x, u):
        return mb.slice_update(
            x=x, update=u, begin=begin, end=end, squeeze_mask=[bool(s) for s in squeeze]
        )

    (got,) = evaluate_program(prog, {"x": base, "u": update}).values()
    expected = base.copy()
    index = tuple(slice(b, e) for b, e in zip(begin, end, strict=True))
    expected[index] = update.reshape(expected[index].shape)
    np.testing.assert_array_equal(got, expected)


def test_a_stateful_model_is_pruned_with_its_states_and_verified(tmp_path, capsys):
    model = ct.convert(
        _kv_cache_program(), convert_to="mlprogram", pass_pipeline=ct.PassPipeline.EMPTY,
        minimum_deployment_target=ct.target.iOS18, skip_model_load=True,
    )  # fmt: skip
    src, out = tmp_path / "kv.mlpackage", tmp_path / "kv_2of4.mlpackage"
    model.save(str(src))
    _, report = ms.compress_with_report(src, "2:4", output=out)
    assert sorted(d.name for d in report.decisions if d.compressed) == [
        "k_weight", "o_weight", "q_weight", "v_weight"
    ]  # fmt: skip
    ops = [op.op_type for op in ms.load_program(out).functions["main"].operations]
    assert ops.count("read_state") == 4 and ops.count("coreml_update_state") == 2
    assert ops.count("slice_update") == 2
    # one step at position 3 from given caches (verify's .npz holds one sample)
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "in.npz", x=np.ones((1, 1, D), np.float16), pos=np.array([3], np.int32),
             k_cache=rng.standard_normal((1, T, D)).astype(np.float16),
             v_cache=rng.standard_normal((1, T, D)).astype(np.float16))  # fmt: skip
    for extra in ([], ["--inputs", str(tmp_path / "in.npz")]):
        assert main(["verify", str(src), str(out), "--min-cosine", "0.9", "--min-snr", "5",
                     "--json", *extra]) == 0  # fmt: skip
        import json

        checked = json.loads(capsys.readouterr().out)
        assert checked["passed"] and all(w["pattern_holds"] for w in checked["weights"])
