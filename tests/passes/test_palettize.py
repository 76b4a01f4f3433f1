"""milsparse::palettize on dense weights: op sequence, exact decode (our kernels and
coremltools'), table quality, per-group tables, iOS16 form, non-matches with reasons."""

from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from milsparse.fixtures import programs
from milsparse.ir import formats, lut
from milsparse.ir.chain import Form, weight_chain
from milsparse.passes.config import PruneConfig, parse_prune_spec
from milsparse.passes.lut_config import (
    PalettizeConfig,
    PalettizeSpec,
    parse_palettize_config,
    parse_palettize_spec,
)
from milsparse.passes.palettize import PalettizeWeights
from milsparse.passes.prune import PruneWeights

import milsparse as ms
from milsparse.errors import ConfigError


def _run(prog, config):
    pass_ = PalettizeWeights(config)
    pass_(prog)
    prog.validate()
    return pass_


def _op(prog, name):
    return next(o for o in prog.functions["main"].operations if o.name == name)


def _heavy(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, shape) * 0.05
    w *= rng.lognormal(0, 0.7, (shape[0],) + (1,) * (len(shape) - 1))  # channel scales
    return w.astype(dtype)


@pytest.mark.parametrize("opset", [ct.target.iOS16, ct.target.iOS18], ids=["ios16", "ios18"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("spec", ["lut2", "lut4", "lut4:uniform", "lut8"])
def test_dense_weight_becomes_an_exactly_decoded_lut(opset, dtype, spec, tmp_path):
    weight = _heavy((48, 64), dtype)
    prog = programs.single_op("linear", dtype=dtype, opset=opset, weight=weight)
    pass_ = _run(prog, PalettizeConfig(parse_palettize_spec(spec), min_size=16))
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert d.compressed and d.spec == spec
    op = _op(prog, "weight")
    assert op.op_type == "constexpr_lut_to_dense"
    assert ("shape" in op.inputs) == (opset == ct.target.iOS16)
    chain = weight_chain(op)
    nbits = int(spec[3])
    assert chain.form is Form.PALETTIZED and chain.nbits == nbits
    assert chain.stored_bytes == d.stored_bytes < d.dense_bytes
    ours = chain.decode()
    theirs = op.materialized_val_inference()
    np.testing.assert_array_equal(ours, np.asarray(theirs).astype(np.float32))
    # every value took its table's nearest entry
    table = np.unique(ours)
    assert table.size <= 1 << nbits
    nearest = table[np.abs(weight.astype(np.float64)[..., None] - table).argmin(axis=-1)]
    np.testing.assert_array_equal(ours, nearest.astype(np.float32))
    # the package on disk: loads back with the same weight, its file as accounted
    path = tmp_path / "m.mlpackage"
    programs.program_to_mlmodel(prog).save(str(path))
    loaded = ms.load_program(path)
    np.testing.assert_array_equal(weight_chain(_op(loaded, "weight")).decode(), ours)
    blob = Path(path, "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    assert blob <= formats.BLOB_FILE_HEADER_BYTES + sum(
        r.stored_bytes for r in ms.inspect_model(path).rows
    )


def test_kmeans_tables_beat_uniform_ones_and_fit_each_group_on_its_own():
    weight = _heavy((64, 128), np.float16, seed=1)
    errors = {}
    for spec in ("lut4", "lut4:uniform", "lut4@g16"):
        prog = programs.single_op("linear", dtype=np.float16, shape=weight.shape, weight=weight)
        _run(prog, PalettizeConfig(parse_palettize_spec(spec), min_size=16))
        decoded = weight_chain(_op(prog, "weight")).decode()
        w = weight.astype(np.float64)
        errors[spec] = float(((decoded - w) ** 2).sum() / (w**2).sum())
        if spec == "lut4@g16":
            op = _op(prog, "weight")
            assert op.lut.shape == (4, 1, 16, 1)
            for g in range(4):  # each group's table is the exact k-means of its own values
                rows = weight[16 * g : 16 * (g + 1)]
                table = lut.fit_lut(rows.ravel(), 4)
                np.testing.assert_array_equal(op.lut.val[g, 0, :, 0], table)
    assert errors["lut4"] < errors["lut4:uniform"]
    assert errors["lut4@g16"] < errors["lut4"]  # channel scales differ: per-group tables win


def test_what_is_left_as_it_is_says_why():
    prog = programs.single_op("linear", opset=ct.target.iOS16, shape=(48, 64))
    pass_ = _run(prog, PalettizeConfig(parse_palettize_spec("lut3"), min_size=16))
    assert "lut3 needs iOS18" in pass_.report[0].reason
    prog = programs.single_op("linear", shape=(40, 64))
    pass_ = _run(prog, PalettizeConfig(parse_palettize_spec("lut4@g16"), min_size=16))
    assert "40 output channels are not a multiple of group_size 16" in pass_.report[0].reason
    assert _op(prog, "weight").op_type == "const"
    pruned16 = programs.single_op("linear", shape=(48, 64), opset=ct.target.iOS16)
    PruneWeights(PruneConfig(parse_prune_spec("2:4"), min_size=16))(pruned16)
    pass_ = _run(pruned16, PalettizeConfig(parse_palettize_spec("lut4"), min_size=16))
    (row,) = [d for d in pass_.report if d.name == "weight"]
    assert row.reason.startswith("already compressed: sparse(ios16); joint forms need the iOS18")
    twice = programs.single_op("linear", shape=(48, 64))
    _run(twice, PalettizeConfig(parse_palettize_spec("lut4"), min_size=16))
    pass_ = _run(twice, PalettizeConfig(parse_palettize_spec("lut2"), min_size=16))
    assert [d.reason for d in pass_.report if d.name == "weight"] == ["already compressed: lut4"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("spec", ["lut4", "lut2@g16", "lut3"])
def test_sparse_weights_get_the_joint_form_fitted_on_their_nonzeros(dtype, spec, tmp_path):
    """prune then palettize: constexpr_lut_to_sparse -> constexpr_sparse_to_dense; the zeros
    stay exactly where pruning put them, and each group's table is the exact k-means of its
    nonzeros (coremltools fits it with the zeros, spending an entry on them)."""
    weight = _heavy((64, 96), dtype, seed=2)
    prog = programs.single_op("linear", dtype=dtype, shape=weight.shape, weight=weight)
    PruneWeights(PruneConfig(parse_prune_spec("2:4"), min_size=16))(prog)
    pruned = weight_chain(_op(prog, "weight")).decode()
    sparse_bytes = weight_chain(_op(prog, "weight")).stored_bytes
    pass_ = _run(prog, PalettizeConfig(parse_palettize_spec(spec), min_size=16))
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert d.compressed and d.spec == f"sparse+{spec}" and d.stored_bytes < sparse_bytes
    root = _op(prog, "weight")
    assert root.op_type == "constexpr_sparse_to_dense"
    assert root.nonzero_data.op.op_type == "constexpr_lut_to_sparse"
    chain = weight_chain(root)
    nbits = int(spec[3])
    assert chain.form is Form.SPARSE_PALETTIZED and chain.label == f"sparse+lut{nbits}"
    assert chain.stored_bytes == d.stored_bytes and chain.sparsity == pytest.approx(0.5)
    ours = chain.decode()
    np.testing.assert_array_equal(ours, np.asarray(root.materialized_val_inference(), np.float32))
    np.testing.assert_array_equal(ours == 0, pruned == 0)
    groups = 4 if "@g16" in spec else 1
    rows = weight.shape[0] // groups
    for g in range(groups):
        kept = pruned[g * rows : (g + 1) * rows]
        nonzeros = kept[kept != 0].astype(dtype)
        table = lut.fit_lut(nonzeros, nbits)
        got = ours[g * rows : (g + 1) * rows]
        np.testing.assert_array_equal(got[kept != 0], table[lut.assign_indices(nonzeros, table)])
    path = tmp_path / "joint.mlpackage"
    programs.program_to_mlmodel(prog).save(str(path))
    np.testing.assert_array_equal(weight_chain(_op(ms.load_program(path), "weight")).decode(), ours)


def test_verify_passes_a_4_bit_mlp(save_program):
    path = save_program(programs.mlp(sizes=(64, 128, 128, 10), dtype=np.float16))
    prog = ms.load_program(path)
    _run(prog, PalettizeConfig(parse_palettize_spec("lut4"), min_size=1024))
    from milsparse import _io

    model = ct.models.MLModel(str(path), skip_model_load=True)
    candidate = _io.program_to_model(prog, model.get_spec().specificationVersion, model)
    report = ms.verify(path, candidate)
    assert report.passed, report
    assert {w.format for w in ms.inspect_model(candidate).rows if w.name.endswith("weight")} >= {
        "lut4"
    }


@pytest.mark.parametrize(
    "value, message",
    [
        ("lut5", "nbits"),
        ("lut4@g0", "group_size"),
        ("lut4:median", "mode"),
        ("palette4", "bad palettize spec"),
        ({"spec": "lut4", "op_types": ["LINEAR"]}, "did you mean 'linear'"),
        ({"spec": {"nbits": True}}, "nbits"),
        ({"spec": "lut4", "extra": 1}, "unknown palettize config keys"),
    ],
)
def test_bad_palettize_configs_are_refused(value, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        parse_palettize_config(value)


def test_spec_strings_read_back():
    for text in ("lut1", "lut4", "lut4@g16", "lut6:uniform", "lut8@g8:uniform"):
        spec = parse_palettize_spec(text)
        assert spec.to_string() == text and parse_palettize_spec(spec.to_string()) == spec
    assert parse_palettize_config("lut4").spec == PalettizeSpec(4)
