"""Pruning a palettized or quantized weight into the joint iOS18 forms, without refitting: the
kept values stay bit-identical to what the weight decoded to (coremltools' joint_compression
order), whoever compressed it first."""

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from milsparse.fixtures import programs
from milsparse.ir.chain import Form, weight_chain
from milsparse.passes.lut_config import PalettizeConfig, parse_palettize_spec
from milsparse.passes.palettize import PalettizeWeights
from milsparse.passes.prune import PruneWeights
from milsparse.passes.prune_config import PruneConfig, parse_prune_spec
from milsparse.passes.quantize import QuantizeWeights

SHAPE = (64, 96)


def _weight(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, SHAPE) * 0.05).astype(np.float16)


def _palettized(spec):
    prog = programs.single_op("linear", dtype=np.float16, shape=SHAPE, weight=_weight())
    PalettizeWeights(PalettizeConfig(parse_palettize_spec(spec), min_size=16))(prog)
    return prog


def _by_hand(kind):
    """iOS18 compressed weights as coremltools writes them."""
    rng = np.random.default_rng(1)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 96), dtype=types.fp16)],
                opset_version=ct.target.iOS18)  # fmt: skip
    def prog(x):
        if kind == "lut":
            w = mb.constexpr_lut_to_dense(
                indices=rng.integers(0, 16, SHAPE).astype(types.np_uint4_dtype),
                lut=np.sort(rng.standard_normal((2, 1, 16, 1)), axis=2).astype(np.float16),
                name="weight",
            )
        elif kind == "int8":
            w = mb.constexpr_blockwise_shift_scale(
                data=rng.integers(-128, 128, SHAPE).astype(np.int8),
                scale=rng.uniform(0.001, 0.01, (SHAPE[0], 1)).astype(np.float16),
                offset=rng.integers(-3, 3, (SHAPE[0], 1)).astype(np.int8),
                name="weight",
            )
        else:  # int4, per block of 32 input channels
            w = mb.constexpr_blockwise_shift_scale(
                data=rng.integers(-8, 8, SHAPE).astype(types.np_int4_dtype),
                scale=rng.uniform(0.01, 0.1, (SHAPE[0], 3)).astype(np.float16),
                name="weight",
            )
        return mb.linear(x=x, weight=w, name="layer")

    return prog


def _weight_op(prog):
    return next(o for o in prog.functions["main"].operations if o.name == "weight")


CASES = {
    "milsparse lut4": (lambda: _palettized("lut4"), Form.SPARSE_PALETTIZED, "sparse+lut4"),
    "milsparse lut3@g16": (lambda: _palettized("lut3@g16"), Form.SPARSE_PALETTIZED,
                           "sparse+lut3"),
    "coremltools lut4, 2 groups": (lambda: _by_hand("lut"), Form.SPARSE_PALETTIZED,
                                   "sparse+lut4"),
    "coremltools int8 per channel": (lambda: _by_hand("int8"), Form.SPARSE_QUANTIZED,
                                     "sparse+int8"),
    "coremltools int4 per block": (lambda: _by_hand("int4"), Form.SPARSE_QUANTIZED,
                                   "sparse+int4"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("spec", ["unstructured:0.5", "2:4"])
def test_pruning_a_compressed_weight_keeps_its_values_bit_identical(case, spec):
    build, form, label = CASES[case]
    prog = build()
    before = weight_chain(_weight_op(prog)).decode()
    stored_before = weight_chain(_weight_op(prog)).stored_bytes
    pass_ = PruneWeights(PruneConfig(parse_prune_spec(spec), min_size=16))
    pass_(prog)
    prog.validate()
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert d.compressed, d.reason
    root = _weight_op(prog)
    chain = weight_chain(root)
    assert (chain.form, chain.label) == (form, label)
    assert chain.stored_bytes == d.stored_bytes < stored_before
    after = chain.decode()
    np.testing.assert_array_equal(after, np.asarray(root.materialized_val_inference(), np.float32))
    kept = after != 0
    np.testing.assert_array_equal(after[kept], before[kept])  # not refitted: bit-identical
    assert d.sparsity >= 0.5 and chain.sparsity == pytest.approx(d.sparsity)
    if spec == "2:4":  # the pattern holds on the decoded weight
        groups = (~kept).reshape(SHAPE[0], -1, 4).sum(axis=-1)
        assert groups.min() >= 2
    else:  # the smallest decoded magnitudes went
        pruned = np.abs(before[~kept & (before != 0)])
        assert pruned.size == 0 or pruned.max() <= np.abs(after[kept]).min()


def test_ios16_compressed_weights_are_left_with_the_target_to_set():
    prog = programs.single_op("linear", dtype=np.float16, shape=SHAPE, weight=_weight(),
                              opset=ct.target.iOS16)  # fmt: skip
    PalettizeWeights(PalettizeConfig(parse_palettize_spec("lut4"), min_size=16))(prog)
    pass_ = PruneWeights(PruneConfig(parse_prune_spec("2:4"), min_size=16))
    pass_(prog)
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert not d.compressed and "joint forms need the iOS18 operands" in d.reason
    assert _weight_op(prog).op_type == "constexpr_lut_to_dense"


def test_a_joint_form_that_saves_nothing_is_not_emitted():
    """2-bit indices at 50% sparsity: a 1-bit mask plus half the indices is no smaller."""
    prog = _palettized("lut2")
    pass_ = PruneWeights(PruneConfig(parse_prune_spec("unstructured:0.5"), min_size=16))
    pass_(prog)
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert not d.compressed and d.reason.startswith("joint form would not be smaller")
    assert _weight_op(prog).op_type == "constexpr_lut_to_dense"


def _with_non_finite(kind):
    """An iOS18 weight holding inf: dense, sparse (in its nonzero values), palettized (in its
    table) or quantized (its decoded values overflow fp16)."""
    weight = _weight().astype(np.float16)
    weight[5, 7] = np.inf

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 96), dtype=types.fp16)],
                opset_version=ct.target.iOS18)  # fmt: skip
    def prog(x):
        if kind == "dense":
            w = mb.const(val=weight, name="weight")
        elif kind == "sparse":
            keep = np.abs(weight) > np.median(np.abs(weight.astype(np.float32)))
            w = mb.constexpr_sparse_to_dense(
                nonzero_data=weight[keep], mask=keep.astype(types.np_uint1_dtype), name="weight"
            )
        elif kind == "int8":  # finite stored values; 127 x 1000 overflows fp16 on decode
            w = mb.constexpr_blockwise_shift_scale(
                data=np.full(SHAPE, 127, np.int8), scale=np.full((SHAPE[0], 1), 1000, np.float16),
                name="weight",
            )  # fmt: skip
        else:
            lut = np.linspace(-1, 1, 16, dtype=np.float16).reshape(1, 1, 16, 1)
            lut[0, 0, 3, 0] = np.inf
            w = mb.constexpr_lut_to_dense(
                indices=np.arange(np.prod(SHAPE)).reshape(SHAPE).astype(types.np_uint4_dtype) % 16,
                lut=lut, name="weight",
            )  # fmt: skip
        return mb.linear(x=x, weight=w, name="layer")

    return prog


@pytest.mark.parametrize(
    ("make", "kinds"),
    [
        (
            lambda: PruneWeights({"spec": "unstructured:0.5", "min_size": 16}),
            ("dense", "lut", "int8"),
        ),
        (lambda: PalettizeWeights({"spec": "lut4", "min_size": 16}), ("dense", "sparse")),
        (lambda: QuantizeWeights({"spec": "int8", "min_size": 16}), ("dense", "sparse")),
    ],
    ids=["prune", "palettize", "quantize"],
)
def test_a_weight_holding_inf_stays_as_it_is_in_every_pass(make, kinds):
    """One rule in the template: a weight whose stored values hold inf or nan is left as it is,
    with the same reason, whatever the pass and whatever form the weight has."""
    for kind in kinds:
        prog = _with_non_finite(kind)
        before = weight_chain(prog.functions["main"].find_ops(op_type="linear")[0].weight.op)
        pass_ = make()
        pass_(prog)
        decision = next(d for d in pass_.report if d.name == "weight")
        assert (decision.compressed, decision.reason) == (False, "non-finite values (inf or nan)")
        after = weight_chain(prog.functions["main"].find_ops(op_type="linear")[0].weight.op)
        assert after.form is before.form and after.ops == before.ops
