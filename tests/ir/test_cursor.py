"""The interpreter's Cursor: samples stepped through a function together, a stretch at a time,
resumable across changes to the program (sequential calibration's engine)."""

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from milsparse.fixtures import programs
from milsparse.ir.cursor import Cursor
from milsparse.ir.interpreter import StopRun, evaluate_program
from milsparse.passes._rewrite import replace_op


def _samples(prog, n, seed=0):
    rng = np.random.default_rng(seed)
    (name, var), *_ = prog.functions["main"].inputs.items()
    return [{name: rng.standard_normal(var.shape).astype(np.float32)} for _ in range(n)]


def _op(prog, name):
    return next(op for op in prog.functions["main"].operations if op.name == name)


def _assert_same(got, want):
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("stretch_bytes", [1, 40_000, 1 << 30])
def test_a_run_to_the_end_equals_evaluate_program(dtype, stretch_bytes):
    prog = programs.transformer_block(dtype=dtype)
    samples = _samples(prog, 3)
    cursor = Cursor(prog, samples, stretch_bytes=stretch_bytes)
    steps = []
    cursor.advance(progress=lambda done, total: steps.append((done, total)))
    for got, sample in zip(cursor.outputs(), samples, strict=True):
        _assert_same(got, evaluate_program(prog, sample))
    assert steps[-1][0] == steps[-1][1] and steps[-1][1] % 3 == 0  # samples x stretches
    if stretch_bytes == 1:  # every weight its own stretch
        assert steps[-1][1] >= 3 * 6


def test_stopping_and_going_on_changes_nothing():
    prog = programs.transformer_block()
    samples = _samples(prog, 2)
    cursor = Cursor(prog, samples)
    for name in ("attn_k", "attn_out", "ff2"):
        cursor.advance(until=_op(prog, name))
        assert not cursor.reached(_op(prog, name))
        assert cursor.reached(_op(prog, "attn_q"))
    with pytest.raises(RuntimeError, match="not reached the end"):
        cursor.outputs()
    cursor.advance()
    for got, sample in zip(cursor.outputs(), samples, strict=True):
        _assert_same(got, evaluate_program(prog, sample))


def test_probe_shows_the_inputs_and_leaves_the_cursor_where_it_is():
    prog = programs.transformer_block()
    samples = _samples(prog, 3)
    ff1 = _op(prog, "ff1")
    expected = []
    for sample in samples:  # ff1's inputs, from one full run each

        def grab(op, values):
            expected.append(values["x"].copy())

        evaluate_program(prog, sample, observers={id(ff1): grab})
    cursor = Cursor(prog, samples)
    cursor.advance(until=ff1)
    seen = []

    def observe(op, values):
        seen.append(values["x"].copy())
        raise StopRun

    cursor.probe([ff1], {id(ff1): observe})
    cursor.probe([ff1], {id(ff1): observe})  # twice: the probe kept nothing
    assert len(seen) == 6
    for got, want in zip(seen, expected + expected, strict=True):
        np.testing.assert_array_equal(got, want)
    cursor.advance()
    for got, sample in zip(cursor.outputs(), samples, strict=True):
        _assert_same(got, evaluate_program(prog, sample))


def test_a_weight_replaced_ahead_of_the_cursor_is_what_the_run_uses():
    """A pass prunes ff2's weight while the cursor waits before ff2: the rest of the run uses
    the new constexpr ops (inserted where the old const was, which the cursor had passed), and
    the removed const's value is dropped from every sample."""
    from milsparse.ir import formats

    prog = programs.transformer_block(dtype=np.float16)
    samples = _samples(prog, 2)
    cursor = Cursor(prog, samples)
    ff2 = _op(prog, "ff2")
    cursor.advance(until=ff2)
    const = ff2.weight.op
    assert cursor.reached(const)
    weight = const.val.val
    keep = np.abs(weight) >= np.median(np.abs(weight))
    enc = formats.encode_sparse_ios18(weight, keep)

    def build(site, tmp_name):
        data = site.const(enc.nonzero_data, "ff2_nonzero_data")
        mask = site.const(enc.mask.view(ct.converters.mil.mil.types.np_uint1_dtype), "ff2_mask")
        return mb.constexpr_sparse_to_dense(
            nonzero_data=data, mask=mask, name=tmp_name, before_op=site.op
        )

    old = const.outputs[0]
    assert all(id(old) in env for env in cursor._envs)
    with prog.functions["main"]:
        replace_op(const, build)
    cursor.advance(until=ff2)  # runs the new constexpr ops, forgets the old value
    assert not any(id(old) in env for env in cursor._envs)
    cursor.advance()
    for got, sample in zip(cursor.outputs(), samples, strict=True):
        _assert_same(got, evaluate_program(prog, sample))
    dense_outputs = evaluate_program(programs.transformer_block(dtype=np.float16), samples[0])
    assert not np.array_equal(next(iter(dense_outputs.values())),
                              next(iter(cursor.outputs()[0].values())))  # fmt: skip


def test_ops_inside_control_flow_are_reached_through_their_top_level_op():
    prog = programs.branches(16)
    cond = next(op for op in prog.functions["main"].operations if op.op_type == "cond")
    block = cond.blocks[0]
    inner = next(op for op in block.operations if op.op_type == "linear")
    samples = [{"x": np.ones((2, 16), np.float32)}, {"x": -np.ones((2, 16), np.float32)}]
    cursor = Cursor(prog, samples)
    cursor.advance(until=inner)
    assert not cursor.reached(inner)
    seen = []
    cursor.probe([inner], {id(inner): lambda op, values: seen.append(values["x"][0, 0])})
    assert seen == [1.0]  # only the sample whose branch holds the op ran it
    cursor.advance()
    assert cursor.reached(inner)
    for got, sample in zip(cursor.outputs(), samples, strict=True):
        _assert_same(got, evaluate_program(prog, sample))
