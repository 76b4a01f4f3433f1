"""milsparse::palettize on dense weights: op sequence, exact decode (our kernels and
coremltools'), table quality, per-group tables, iOS16 form, non-matches with reasons."""

from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
from milsparse.fixtures import programs
from milsparse.ir import formats, lut
from milsparse.ir.chain import Form, weight_chain
from milsparse.passes.lut_config import (
    PalettizeConfig,
    PalettizeSpec,
    parse_palettize_config,
    parse_palettize_spec,
)
from milsparse.passes.palettize import PalettizeWeights
from milsparse.passes.prune import PruneWeights
from milsparse.passes.prune_config import PruneConfig, parse_prune_spec

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
    from milsparse import package

    model = ct.models.MLModel(str(path), skip_model_load=True)
    candidate = package.program_to_model(prog, model.get_spec().specificationVersion, model)
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
    for text in ("lut1", "lut4", "lut4@g16", "lut6:uniform", "lut8@g8:uniform", "lut4x2@g8"):
        spec = parse_palettize_spec(text)
        assert spec.to_string() == text and parse_palettize_spec(spec.to_string()) == spec
    assert parse_palettize_config("lut4").spec == PalettizeSpec(4)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(
    "op_type, spec",
    [
        ("linear", "lut4x2"),
        ("linear", "lut2x4@g16"),
        ("conv", "lut3x2"),
        ("conv_transpose", "lut4x2@g4"),
        ("matmul", "lut4x4"),
    ],
)
def test_vector_palettization_decodes_exactly_along_the_output_channels(dtype, op_type, spec):
    """cluster_dim V: every table entry is V consecutive output channels' values; the lut is
    [.., 2^n, V] with vector_axis the output-channel axis (conv_transpose: axis 1, matmul's y:
    its last axis), and every vector takes its nearest entry."""
    prog = programs.single_op(op_type, dtype=dtype)
    weight = _op(prog, "weight").val.val.copy()
    pass_ = _run(prog, PalettizeConfig(parse_palettize_spec(spec), min_size=16))
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert d.compressed and d.spec == spec, d.reason
    op = _op(prog, "weight")
    axis = {"linear": 0, "conv": 0, "conv_transpose": 1, "matmul": 1}[op_type]
    vector = int(spec.split("x")[1][0])
    assert op.op_type == "constexpr_lut_to_dense" and int(op.vector_axis.val) == axis
    assert op.lut.shape[-1] == vector and op.indices.shape[axis] * vector == weight.shape[axis]
    chain = weight_chain(op)
    assert chain.vector_size == vector and chain.label.startswith(f"lut{spec[3]}x{vector}")
    ours = chain.decode()
    np.testing.assert_array_equal(ours, np.asarray(op.materialized_val_inference(), np.float32))
    # nearest entry: no table vector is closer to a weight vector than the one it decodes to
    moved = np.moveaxis(weight.astype(np.float64), axis, -1)
    vectors = moved.reshape(-1, vector)
    decoded = np.moveaxis(ours.astype(np.float64), axis, -1).reshape(-1, vector)
    groups = 1 if "@g" not in spec else weight.shape[axis] // int(spec.split("@g")[1])
    table = op.lut.val.reshape(groups, -1, vector).astype(np.float64)
    channel = np.arange(vectors.shape[0]) % (weight.shape[axis] // vector)
    group = channel // ((weight.shape[axis] // vector) // groups)
    best = ((vectors[:, None, :] - table[group]) ** 2).sum(-1).min(-1)
    got = ((vectors - decoded) ** 2).sum(-1)
    np.testing.assert_allclose(got, best, rtol=1e-6, atol=1e-12)
    assert chain.stored_bytes == d.stored_bytes < d.dense_bytes


def test_vector_kmeans_is_closer_than_a_random_table_and_seeded():
    rng = np.random.default_rng(3)
    vectors = (rng.standard_t(3, (20000, 2)) * 0.05).astype(np.float32)
    table = lut.fit_vector_lut(vectors, 4)
    np.testing.assert_array_equal(table, lut.fit_vector_lut(vectors, 4))  # deterministic
    error = ((vectors - table[lut.assign_vector_indices(vectors, table)]) ** 2).sum()
    random_table = vectors[rng.choice(len(vectors), 16, replace=False)]
    random_error = (
        (vectors - random_table[lut.assign_vector_indices(vectors, random_table)]) ** 2
    ).sum()
    assert error < 0.7 * random_error
    few = np.array([[1, 2], [3, 4], [1, 2]], np.float16)
    table = lut.fit_vector_lut(few, 2)
    np.testing.assert_array_equal(table[lut.assign_vector_indices(few, table)], few)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(
    "prune, spec", [("block2@out:0.5", "lut4x2"), ("block4@out:0.5", "lut3x2@g16")]
)
def test_vector_palettization_of_a_pruned_weight(dtype, prune, spec, tmp_path):
    """prune then vector-palettize (coremltools crashes here): the joint form with the mask at
    the indices' shape, expanded over the vectors; zeros stay where pruning put them."""
    weight = _heavy((64, 96), dtype, seed=4)
    prog = programs.single_op("linear", dtype=dtype, shape=weight.shape, weight=weight)
    PruneWeights(PruneConfig(parse_prune_spec(prune), min_size=16))(prog)
    pruned = weight_chain(_op(prog, "weight")).decode()
    pass_ = _run(prog, PalettizeConfig(parse_palettize_spec(spec), min_size=16))
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert d.compressed and d.spec == f"sparse+{spec}", d.reason
    root = _op(prog, "weight")
    lut_op = root.nonzero_data.op
    assert lut_op.op_type == "constexpr_lut_to_sparse" and lut_op.indices_mask.shape == (32, 96)
    chain = weight_chain(root)
    assert chain.form is Form.SPARSE_PALETTIZED and chain.vector_size == 2
    ours = chain.decode()
    np.testing.assert_array_equal(ours, np.asarray(root.materialized_val_inference(), np.float32))
    np.testing.assert_array_equal(ours == 0, pruned == 0)
    path = tmp_path / "joint.mlpackage"
    programs.program_to_mlmodel(prog).save(str(path))
    np.testing.assert_array_equal(weight_chain(_op(ms.load_program(path), "weight")).decode(), ours)


def test_vector_palettization_refuses_masks_that_split_vectors_and_old_targets():
    prog = programs.single_op("linear", shape=(64, 96))
    PruneWeights(PruneConfig(parse_prune_spec("2:4"), min_size=16))(prog)
    pass_ = _run(prog, PalettizeConfig(parse_palettize_spec("lut4x2"), min_size=16))
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert not d.compressed and "prune with block2@out" in d.reason
    assert _op(prog, "weight").nonzero_data.op.op_type == "const"
    prog16 = programs.single_op("linear", shape=(64, 96), opset=ct.target.iOS16)
    pass_ = _run(prog16, PalettizeConfig(parse_palettize_spec("lut4x2"), min_size=16))
    assert "lut4x2 needs iOS18" in pass_.report[0].reason
    odd = programs.single_op("linear", shape=(63, 96))
    pass_ = _run(odd, PalettizeConfig(parse_palettize_spec("lut4x2"), min_size=16))
    assert "63 output channels are not a multiple of cluster_dim 2" in pass_.report[0].reason
    with pytest.raises(ConfigError, match="needs mode kmeans"):
        parse_palettize_spec("lut4x2:uniform")
    with pytest.raises(ConfigError, match="multiple of cluster_dim"):
        parse_palettize_spec("lut4x4@g6")


@pytest.mark.parametrize("spec", ["lut4", "lut2@g2", "lut4x2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tiny_weights_with_min_size_0_are_left_dense_with_a_reason(spec, dtype):
    """Issue finding 10: 1x1 and 0x64 weights crashed palettize with `--min-size 0`
    ('NoneType' object has no attribute 'form')."""
    prog = programs.tiny_weights(dtype=dtype)
    pass_ = _run(prog, {"spec": spec, "min_size": 0})
    rows = {d.name: d for d in pass_.report}
    for name, size in (("tiny", 1), ("w5", 5), ("empty", 0)):
        assert rows[name].reason == (
            f"too small to compress: {size} elements (consts of at most 9 are stored inline)"
        )
        assert _op(prog, name).op_type == "const"
    assert rows["big"].compressed


def test_unique_palettization_is_lossless_with_the_fewest_bits():
    """`lut:unique`: the table holds the weight's distinct values; 5 of them take 3 bits on
    iOS18 and 4 below it (no 3-bit tables there); `lut2:unique` cannot hold 5 and leaves the
    weight dense; text specs have no custom mode (it takes a Python function)."""
    import coremltools as ct
    from milsparse.passes.lut_config import parse_palettize_spec

    rng = np.random.default_rng(0)
    few = rng.choice(np.array([-0.5, -0.25, 0.125, 0.5, 1.0], np.float32), (64, 64))
    for opset, bits in ((ct.target.iOS18, 3), (ct.target.iOS16, 4)):
        prog = programs.single_op("linear", weight=few.copy(), opset=opset)
        pass_ = PalettizeWeights({"spec": "lut:unique", "min_size": 16})
        pass_(prog)
        (d,) = [d for d in pass_.report if d.name == "weight"]
        assert d.compressed and d.spec == f"lut{bits}:unique"
        (op,) = prog.functions["main"].find_ops(op_type="constexpr_lut_to_dense")
        np.testing.assert_array_equal(op.materialized_val_inference(), few)
    prog = programs.single_op("linear", weight=few.copy(), opset=ct.target.iOS18)
    pass_ = PalettizeWeights({"spec": "lut2:unique", "min_size": 16})
    pass_(prog)
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert not d.compressed and d.reason == "5 distinct values in a table; lut2:unique holds 4"
    with pytest.raises(ConfigError, match="mode custom takes a Python lut_function"):
        parse_palettize_spec("lut4:custom")
    with pytest.raises(ConfigError, match="mode kmeans needs nbits"):
        parse_palettize_spec("lut")


def test_channel_axis_groups_tables_along_another_axis():
    """coremltools' channel_axis: `lut4@g16@axis1` gives a table per 16 input channels of a
    linear weight (the lut's group axis is 1), decoding as coremltools decodes it; an axis the
    weight lacks leaves it dense."""
    spec = parse_palettize_spec("lut4@g16@axis1")
    assert spec.channel_axis == 1 and spec.to_string() == "lut4@g16@axis1"
    prog = programs.single_op("linear", shape=(32, 64), opset=ct.target.iOS18)
    pass_ = PalettizeWeights({"spec": "lut4@g16@axis1", "min_size": 16})
    pass_(prog)
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert d.compressed
    (op,) = prog.functions["main"].find_ops(op_type="constexpr_lut_to_dense")
    assert op.lut.shape == (1, 4, 16, 1)
    assert weight_chain(op).decode().shape == (32, 64)
    np.testing.assert_array_equal(weight_chain(op).decode(), op.materialized_val_inference())
    for g in range(4):  # each group of 16 input channels decodes to its own table's entries
        columns = op.materialized_val_inference()[:, 16 * g : 16 * (g + 1)]
        assert set(np.unique(columns)) <= set(np.asarray(op.lut.val)[0, g, :, 0])
    prog = programs.single_op("linear", shape=(32, 64), opset=ct.target.iOS18)
    pass_ = PalettizeWeights({"spec": "lut4@g16@axis2", "min_size": 16})
    pass_(prog)
    assert pass_.report[0].reason == "lut4@g16@axis2: channel_axis 2 of a weight of rank 2"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_per_channel_scale_divides_by_each_line_s_largest_magnitude(dtype):
    """coremltools' enable_per_channel_scale: the weight divided by its largest magnitude
    along the output channels (a scale per input column of a linear weight), palettized, and
    a constexpr_blockwise_shift_scale of the scales reading the table's output; milsparse's
    decode and coremltools' agree, and the error is what the normalised table gives."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((32, 64)) * rng.lognormal(0, 1, (1, 64))).astype(dtype)
    prog = programs.single_op("linear", weight=weight, opset=ct.target.iOS18, dtype=dtype)
    pass_ = PalettizeWeights({"spec": "lut4@pcs", "min_size": 16})
    pass_(prog)
    (d,) = [d for d in pass_.report if d.name == "weight"]
    assert d.compressed and d.spec == "lut4@pcs"
    (root,) = prog.functions["main"].find_ops(op_type="constexpr_blockwise_shift_scale")
    assert root.data.op.op_type == "constexpr_lut_to_dense" and root.scale.shape == (1, 64)
    scales = np.max(np.abs(weight.astype(np.float64)), axis=0, keepdims=True)
    np.testing.assert_array_equal(np.asarray(root.scale.val), scales.astype(dtype))
    chain = weight_chain(root)
    assert chain.label == "lut4+scaled" and chain.ops[-1] is root
    decoded = root.materialized_val_inference()
    np.testing.assert_array_equal(chain.decode().astype(dtype), decoded)
    # one table of the normalised weight: every column decodes to its scale times an entry
    table = np.asarray(root.data.op.lut.val).ravel().astype(np.float64)
    ratios = decoded.astype(np.float64) / scales
    assert np.all(np.min(np.abs(ratios[..., None] - table), axis=-1) < 1e-2)
    with pytest.raises(ConfigError):
        parse_palettize_spec("lut4@pcs:bogus")
