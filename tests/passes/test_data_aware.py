"""Data-aware pruning: calibration statistics from the interpreter's observers (checked against
brute-force im2col and matmul layouts), Wanda's scores, SparseGPT's update, exact patterns,
the error reduction against magnitude pruning, and the errors for bad calibration input."""

import json
import warnings

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil.mil import Builder as mb
from hypothesis import given, settings
from hypothesis import strategies as st
from milsparse.fixtures import programs
from milsparse.ir import calibration, masks
from milsparse.ir.chain import weight_chain
from milsparse.ir.cursor import Cursor
from milsparse.ir.interpreter import StopRun, evaluate_program
from milsparse.passes import data_aware
from milsparse.passes.prune import PruneWeights
from milsparse.passes.prune_config import parse_prune_config
from milsparse.passes.run_context import RunContext

import milsparse as ms
from milsparse.cli import main
from milsparse.errors import ConfigError


def _mlp_and_data(seed=0, samples=16):
    """An MLP whose inputs have a few loud feature columns (as activations of trained models
    do), calibration and held-out samples."""
    prog = programs.mlp(sizes=(64, 256, 256, 10), seed=seed)
    name, var = next(iter(prog.functions["main"].inputs.items()))
    rng = np.random.default_rng(seed + 1)

    def sample():
        x = rng.standard_normal(var.shape).astype(np.float32)
        x[..., :4] *= 20
        return {name: x}

    return name, [sample() for _ in range(samples)], [sample() for _ in range(samples)]


def _pruned(spec, criterion, cal, seed=0, **extra):
    prog = programs.mlp(sizes=(64, 256, 256, 10), seed=seed)
    config = parse_prune_config({"spec": spec, "min_size": 512, "criterion": criterion, **extra})
    graph_pass = PruneWeights(config, RunContext(calibration=calibration.check_samples(prog, cal)))
    graph_pass(prog)
    prog.validate()
    return prog, graph_pass


def _output_error(prog, reference, test) -> float:
    err = energy = 0.0
    for sample in test:
        ref = next(iter(evaluate_program(reference, sample).values()))
        out = next(iter(evaluate_program(prog, sample).values()))
        err += float(((out - ref) ** 2).sum())
        energy += float((ref**2).sum())
    return err / energy


@pytest.mark.parametrize("spec", ["unstructured:0.5", "2:4"])
def test_wanda_and_sparsegpt_move_the_outputs_less_than_magnitude(spec):
    _, cal, test = _mlp_and_data()
    dense = programs.mlp(sizes=(64, 256, 256, 10))
    errors = {c: _output_error(_pruned(spec, c, cal)[0], dense, test)
              for c in ("magnitude", "wanda", "sparsegpt")}  # fmt: skip
    assert errors["wanda"] < 0.85 * errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["wanda"], errors


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
@pytest.mark.parametrize(
    "spec", ["unstructured:0.5", "unstructured@channel:0.3", "2:4", "1:4@out", "block4@out:0.5"]
)
def test_patterns_hold_exactly_under_data_aware_criteria(criterion, spec):
    _, cal, _ = _mlp_and_data(samples=4)
    prog, graph_pass = _pruned(spec, criterion, cal)
    parsed = parse_prune_config(spec).spec
    for d in graph_pass.report:
        if not d.compressed:
            continue
        assert d.note.startswith(f"{criterion}, 4 samples")
        op = next(o for o in prog.functions["main"].operations if o.name == d.name)
        w = weight_chain(op).decode()
        zero = w == 0
        if parsed.pattern == "magnitude" and parsed.scope == "tensor":
            assert zero.sum() == masks.round_half_up(0.5 * w.size)
        elif parsed.pattern == "magnitude":
            per_row = masks.round_half_up(0.3 * w.shape[1])
            assert (zero.sum(axis=1) == per_row).all()
        elif parsed.pattern == "n:m":
            axis = 1 if parsed.resolved_axis == "input" else 0
            moved = np.moveaxis(zero, axis, -1)
            whole = moved.shape[-1] // parsed.m * parsed.m
            groups = moved[..., :whole].reshape(*moved.shape[:-1], -1, parsed.m)
            assert (groups.sum(-1) == parsed.n).all()
        else:
            blocks = zero[: w.shape[0] // 4 * 4].reshape(-1, 4, w.shape[1])
            assert np.all(blocks.all(axis=1) | ~blocks.any(axis=1))  # whole blocks


def test_wanda_keeps_the_per_row_top_scores_of_the_first_layer():
    name, cal, _ = _mlp_and_data(samples=3)
    prog, _ = _pruned("unstructured:0.5", "wanda", cal)
    dense = programs.mlp(sizes=(64, 256, 256, 10))
    w = next(o for o in dense.functions["main"].operations if o.name == "fc0_weight").val.val
    x = np.concatenate([s[name].reshape(-1, w.shape[1]) for s in cal]).astype(np.float64)
    scores = np.abs(w.astype(np.float64)) * np.sqrt((x**2).sum(0) / x.shape[0])[None, :]
    k = masks.round_half_up(0.5 * w.shape[1])
    expected = np.ones(w.shape, bool)
    np.put_along_axis(expected, np.argsort(scores, axis=1, kind="stable")[:, :k], False, 1)
    got = weight_chain(next(o for o in prog.functions["main"].operations
                            if o.name == "fc0_weight")).decode() != 0  # fmt: skip
    np.testing.assert_array_equal(got, expected)


def test_sparsegpt_reconstructs_a_layer_better_than_its_mask_alone():
    """On the first layer, whose inputs are the calibration inputs themselves: SparseGPT's
    updated weights reproduce W X better than the same mask on the original weights."""
    name, cal, _ = _mlp_and_data(samples=8)
    prog, _ = _pruned("2:4", "sparsegpt", cal, sequential=False)
    dense = programs.mlp(sizes=(64, 256, 256, 10))
    w = next(o for o in dense.functions["main"].operations if o.name == "fc0_weight").val.val
    new = weight_chain(next(o for o in prog.functions["main"].operations
                            if o.name == "fc0_weight")).decode()  # fmt: skip
    x = np.concatenate([s[name].reshape(-1, w.shape[1]) for s in cal]).astype(np.float64)
    target = x @ w.astype(np.float64).T
    masked = np.where(new != 0, w, 0).astype(np.float64)
    assert ((x @ new.T - target) ** 2).sum() < 0.7 * ((x @ masked.T - target) ** 2).sum()
    assert not np.array_equal(new[new != 0], w[new != 0])  # the kept weights moved


def test_sequential_calibration_runs_each_weight_on_the_pruned_outputs():
    _, cal, test = _mlp_and_data(samples=8)
    dense = programs.mlp(sizes=(64, 256, 256, 10))
    one_shot, _ = _pruned("2:4", "sparsegpt", cal, sequential=False)
    sequential, graph_pass = _pruned("2:4", "sparsegpt", cal)  # the default for sparsegpt
    assert graph_pass._config.is_sequential
    # both prune the same pattern counts; the two differ in what later layers saw
    a = [weight_chain(o).decode() for o in one_shot.functions["main"].operations
         if o.name == "fc1_weight"][0]  # fmt: skip
    b = [weight_chain(o).decode() for o in sequential.functions["main"].operations
         if o.name == "fc1_weight"][0]  # fmt: skip
    assert (a == 0).sum() == (b == 0).sum() and not np.array_equal(a, b)
    assert _output_error(sequential, dense, test) < _output_error(
        _pruned("2:4", "magnitude", cal)[0], dense, test
    )


# -- statistics -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pad_type, strides, dilations, groups",
    [("valid", [1, 1], [1, 1], 1), ("same", [2, 2], [1, 1], 2), ("custom", [1, 2], [2, 1], 4)],
)
def test_conv_column_statistics_equal_brute_force_im2col(pad_type, strides, dilations, groups):
    rng = np.random.default_rng(3)
    cin, cout, k = 8, 8, 3
    w = rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32)
    pad = [1, 0, 2, 1] if pad_type == "custom" else None

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, cin, 9, 10))])
    def prog(x):
        extra = {"pad": np.array(pad, np.int32)} if pad else {}
        return mb.conv(x=x, weight=w, strides=strides, dilations=dilations, groups=groups,
                       pad_type=pad_type, name="c", **extra)  # fmt: skip

    op = next(o for o in prog.functions["main"].operations if o.op_type == "conv")
    x = rng.standard_normal((2, cin, 9, 10)).astype(np.float32)
    columns = calibration.columns_of(op, "weight")
    stats = calibration.collect(prog, [{"x": x}], {id(op): ("w", columns)}, with_xtx=True)["w"]
    # brute force: every output position's receptive field, with explicit padding
    from milsparse.ir.kernels_nn import _pads

    values = {"pad_type": pad_type, "pad": pad}
    eff = [(k - 1) * d + 1 for d in dilations]
    pads = _pads(values, x.shape[2:], eff, strides)
    padded = np.pad(x, ((0, 0), (0, 0), *pads)).astype(np.float64)
    out_h = (padded.shape[2] - eff[0]) // strides[0] + 1
    out_w = (padded.shape[3] - eff[1]) // strides[1] + 1
    cg = cin // groups
    rows = [[] for _ in range(groups)]
    for n in range(2):
        for i in range(out_h):
            for j in range(out_w):
                for g in range(groups):
                    rows_i = slice(i * strides[0], i * strides[0] + eff[0], dilations[0])
                    cols_j = slice(j * strides[1], j * strides[1] + eff[1], dilations[1])
                    patch = padded[n, g * cg : (g + 1) * cg, rows_i, cols_j]
                    rows[g].append(patch.ravel())
    for g in range(groups):
        cols = np.array(rows[g])
        np.testing.assert_allclose(stats.sq[g], (cols**2).sum(0), rtol=1e-5)
        exact = cols.T @ cols  # X^T X accumulates in float32: relative to its scale
        np.testing.assert_allclose(stats.xtx[g], exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())
    assert stats.rows == 2 * out_h * out_w


@pytest.mark.parametrize("weight_side, transpose", [("y", False), ("y", True), ("x", False)])
def test_matmul_statistics_follow_the_contracted_axis(weight_side, transpose):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 5, 6)).astype(np.float32)  # activations
    if weight_side == "y":
        w = rng.standard_normal((7, 6) if transpose else (6, 7)).astype(np.float32)

        @mb.program(input_specs=[mb.TensorSpec(shape=a.shape)])
        def prog(x):
            return mb.matmul(x=x, y=w, transpose_y=transpose, name="m")

        expected = a.reshape(-1, 6).astype(np.float64)
        feed = a
    else:
        w = rng.standard_normal((4, 5)).astype(np.float32)  # [M, K], activations [.., K, N]

        @mb.program(input_specs=[mb.TensorSpec(shape=(2, 5, 6))])
        def prog(y):
            return mb.matmul(x=w, y=y, name="m")

        expected = np.swapaxes(a, -1, -2).reshape(-1, 5).astype(np.float64)
        feed = a
    op = next(o for o in prog.functions["main"].operations if o.op_type == "matmul")
    columns = calibration.columns_of(op, weight_side)
    name = next(iter(prog.functions["main"].inputs))
    stats = calibration.collect(prog, [{name: feed}], {id(op): ("w", columns)}, with_xtx=True)
    np.testing.assert_allclose(stats["w"].sq[0], (expected**2).sum(0), rtol=1e-5)
    exact = expected.T @ expected  # X^T X accumulates in float32: relative to its scale
    np.testing.assert_allclose(stats["w"].xtx[0], exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())


def test_an_observer_can_end_a_run():
    prog = programs.mlp(sizes=(8, 16, 4))
    name, var = next(iter(prog.functions["main"].inputs.items()))
    seen = []
    first = next(o for o in prog.functions["main"].operations if o.op_type == "linear")

    def stop(op, values):
        seen.append(values["x"].shape)
        raise StopRun

    x = np.ones(var.shape, np.float32)
    assert evaluate_program(prog, {name: x}, observers={id(first): stop}) is None
    assert seen == [tuple(var.shape)]


# -- input errors -----------------------------------------------------------------------------
def test_calibration_errors_are_clear(tmp_path, save_program, capsys):
    path = save_program(programs.mlp(sizes=(64, 256, 10)))
    name = next(iter(ms.load_program(path).functions["main"].inputs))
    shape = ms.load_program(path).functions["main"].inputs[name].shape
    good = tmp_path / "cal.npz"
    np.savez(good, **{name: np.ones((3, *shape), np.float32)})
    with pytest.raises(ConfigError, match="needs calibration inputs"):
        ms.compress(path, {"spec": "2:4", "criterion": "wanda", "min_size": 512})
    cases = {
        "other.npz": ({"other": np.ones((3, *shape), np.float32)}, "missing input"),
        "shape.npz": ({name: np.ones((3, 7), np.float32)}, "has shape (3, 7); the input is"),
        "empty.npz": ({name: np.ones((0, *shape), np.float32)}, "hold no samples"),
        "text.npz": ({name: np.array([["a"] * shape[-1]] * shape[0])[None]}, "is a string array"),
    }
    for file, (arrays, message) in cases.items():
        np.savez(tmp_path / file, **arrays)
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ms.compress(path, {"spec": "2:4", "criterion": "wanda", "min_size": 512},
                        calibration=tmp_path / file)  # fmt: skip
    out = tmp_path / "o.mlpackage"
    base = ["compress", str(path), "-o", str(out), "--prune", "2:4"]
    assert main([*base, "--criterion", "wanda"]) == 2
    assert (
        "--criterion wanda needs calibration inputs: --calibration FILE.npz"
        in capsys.readouterr().err
    )
    assert main([*base, "--calibration", str(good)]) == 2
    assert "--calibration applies with --criterion" in capsys.readouterr().err
    assert main([*base, "--criterion", "wanda", "--calibration", str(tmp_path / "no.npz")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()
    assert main([*base, "--criterion", "sparsegpt", "--calibration", str(good), "--min-size",
                 "512", "--verify", "--json"]) in (0, 1)  # fmt: skip
    report = capsys.readouterr().out
    assert '"sparsegpt, 3 samples' in report  # np.ones inputs: and the singular-X^T X note
    assert '"pattern_holds": false' not in report
    with pytest.raises(ConfigError, match="applies to unstructured, n:m and block"):
        ms.compress(path, {"spec": "threshold:0.1", "criterion": "wanda"}, calibration=good)


# -- allocation -------------------------------------------------------------------------------
def test_global_allocation_hits_the_target_with_less_error_than_uniform(tmp_path, save_program):
    path = save_program(programs.mlp(sizes=(64, 256, 256, 10)))
    _, cal, _ = _mlp_and_data(samples=8)
    config = {"spec": "unstructured:0.6", "allocate": "global", "min_size": 512}
    plot = tmp_path / "curves.png"
    model, report = ms.compress_with_report(path, config, calibration=cal, plot=plot)
    sizes = {d.name: int(np.prod(d.shape)) for d in report.compressed}
    chosen = {d.name: parse_prune_config(d.spec).spec.sparsity for d in report.compressed}
    zeros = sum(masks.round_half_up(chosen[n] * sizes[n]) for n in sizes)
    assert zeros == masks.round_half_up(0.6 * sum(sizes.values()))  # exactly the target
    assert len(set(chosen.values())) > 1  # not uniform
    curves = report.allocation
    assert set(curves) == set(sizes)
    for name, curve in curves.items():
        assert curve["chosen"] == chosen[name]
        assert np.all(np.diff(curve["error"]) >= 0)  # more pruning, more error
    # by the measured curves, the allocation's summed error is below uniform 60%'s
    summed = sum(np.interp(chosen[n], c["sparsity"], c["error"]) for n, c in curves.items())
    flat = sum(np.interp(0.6, c["sparsity"], c["error"]) for c in curves.values())
    assert summed < 0.9 * flat
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    # (on the model's outputs it beats uniform on trained networks: benchmarks/
    # bench_data_aware.py; an untrained MLP gives the layer-wise objective no such edge)
    meta = json.loads(model.user_defined_metadata["com.github.milsparse.pruned"])
    assert {meta[n]["spec"] for n in sizes} == {d.spec for d in report.compressed}
    assert all(w.pattern_holds is not False for w in ms.verify(path, model, samples=2).weights)


def test_budget_allocation_keeps_the_floor_and_says_what_it_tried(save_program, tmp_path):
    path = save_program(programs.mlp(sizes=(64, 256, 256, 10)))
    _, cal, _ = _mlp_and_data(samples=8)
    config = {"spec": "unstructured:0.5", "allocate": "budget", "criterion": "sparsegpt",
              "min_size": 512, "min_cosine": 0.995}  # fmt: skip
    model, report = ms.compress_with_report(path, config, calibration=cal)
    (note,) = [n for n in report.notes if n.startswith("allocate budget")]
    assert "min_cosine 0.995" in note and " ok" in note and "below" in note
    check = ms.verify(path, model, cal, tolerances=ms.Tolerances(min_snr_db=None,
                                                                  min_cosine=0.995))  # fmt: skip
    assert check.passed, check.failures
    looser = dict(config, min_cosine=0.95)
    _, loose_report = ms.compress_with_report(path, looser, calibration=cal)
    assert loose_report.totals()["stored_bytes"] < report.totals()["stored_bytes"]
    out = tmp_path / "cli.mlpackage"
    npz = tmp_path / "cal.npz"
    name = next(iter(cal[0]))
    np.savez(npz, **{name: np.stack([s[name] for s in cal])})
    args = ["compress", str(path), "-o", str(out), "--prune", "unstructured:0.5",
            "--allocate", "budget", "--min-cosine", "0.99", "--calibration", str(npz),
            "--min-size", "512"]  # fmt: skip
    assert main(args) == 0 and out.exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"spec": "2:4", "allocate": "global"}, "needs a pattern with one"),
        ({"spec": "unstructured:0.5", "allocate": "budget"}, "needs a fidelity floor"),
        ({"spec": "unstructured:0.5", "min_cosine": 0.9}, "floor of allocate budget"),
        ({"spec": "unstructured:0.5", "allocate": "local"}, "allocate must be one of"),
        ({"spec": "unstructured:0.5", "allocate": "budget", "min_snr": True}, "finite number"),
    ],
)
def test_bad_allocation_configs(config, message):
    with pytest.raises(ConfigError, match=message):
        parse_prune_config(config)


def test_allocation_and_plot_need_their_inputs(save_program, tmp_path, capsys):
    path = save_program(programs.mlp(sizes=(64, 256, 10)))
    with pytest.raises(ConfigError, match="allocate global needs calibration"):
        ms.compress(path, {"spec": "unstructured:0.5", "allocate": "global"})
    with pytest.raises(ConfigError, match="plot draws the curves"):
        ms.compress(path, "unstructured:0.5", plot=tmp_path / "p.png")
    out = tmp_path / "o.mlpackage"
    assert main(["compress", str(path), "-o", str(out), "--prune", "unstructured:0.5",
                 "--plot", str(tmp_path / "p.png")]) == 2  # fmt: skip
    assert "--plot draws the curves" in capsys.readouterr().err
    assert main(["compress", str(path), "-o", str(out), "--prune", "unstructured:0.5",
                 "--min-cosine", "0.9"]) == 2  # fmt: skip
    assert "only apply with --verify" in capsys.readouterr().err


# -- palettization and quantization weighted by activation energy -------------------------------
@pytest.mark.parametrize("steps", [["lut3"], ["2:4", "lut3"], ["int4"], ["2:4", "int4@b16"]])
def test_calibration_weights_lut_and_range_fits_by_activation_energy(save_program, steps):
    """With calibration, each weight's table or quantization ranges minimise the squared error
    weighted by its input columns' activation energy: on that objective the weighted fit is
    never worse than the unweighted one (and here better), weight by weight."""
    path = save_program(programs.mlp(sizes=(64, 256, 256, 10)))
    name, cal, _ = _mlp_and_data(samples=6)
    recipe = [{ms.recipe.kind_of_text(s): {"spec": s, "min_size": 512}} for s in steps]
    plain = ms.load_program(ms.compress(path, recipe, target="ios18"))
    weighted = ms.load_program(ms.compress(path, recipe, target="ios18", calibration=cal))
    dense = ms.load_program(path)
    targets = {}
    for op in dense.functions["main"].operations:
        if op.op_type == "linear" and op.weight.op.name.endswith("weight"):
            columns = calibration.columns_of(op, "weight")
            targets[id(op)] = (op.weight.op.name, columns)
    stats = calibration.collect(dense, calibration.check_samples(dense, cal), targets,
                                with_xtx=False)  # fmt: skip
    better = 0
    for weight_name, layer in stats.items():
        if layer.sq is None or next(o for o in dense.functions["main"].operations
                                    if o.name == weight_name).val.val.size < 512:  # fmt: skip
            continue
        w = next(o for o in dense.functions["main"].operations if o.name == weight_name).val.val
        energy = (layer.sq[0] / layer.rows)[None, :]
        decoded = {}
        for label, prog in (("plain", plain), ("weighted", weighted)):
            op = next(o for o in prog.functions["main"].operations if o.name == weight_name)
            decoded[label] = weight_chain(op).decode().astype(np.float64)
        kept = decoded["plain"] != 0 if len(steps) > 1 else np.ones(w.shape, bool)
        errors = {
            k: float((energy * kept * (v - w.astype(np.float64)) ** 2).sum())
            for k, v in decoded.items()
        }
        assert errors["weighted"] <= errors["plain"] * (1 + 1e-9), (weight_name, errors)
        better += errors["weighted"] < 0.99 * errors["plain"]
    assert better >= 1


def test_sparsegpt_says_when_the_calibration_inputs_are_rank_deficient():
    """Inputs that span fewer dimensions than the layer's inputs make X^T X singular: the
    report's note says so in a few words: too few rows (more samples help) or dependent
    inputs (as a LayerNorm output's are by construction), which the dampening handles."""
    name, _, cal = _mlp_and_data(samples=40)
    repeated = []
    for sample in cal:
        x = sample[name].copy()
        x[..., 32:] = x[..., :32]  # 64 inputs, 32 dimensions
        repeated.append({name: x})
    _, graph_pass = _pruned("2:4", "sparsegpt", repeated, sequential=False)
    first = next(d for d in graph_pass.report if d.name == "fc0_weight")
    assert first.note.endswith("X^T X singular: dependent inputs (dampening 0.01 handles it)")
    # 6 samples of 2 rows: 12 rows for 64 inputs, too few
    _, graph_pass = _pruned("2:4", "sparsegpt", cal[:6], sequential=False)
    note = next(d for d in graph_pass.report if d.name == "fc0_weight").note
    assert "X^T X singular: 12 activation rows for 64 inputs (more samples help)" in note
    _, graph_pass = _pruned("2:4", "sparsegpt", cal, sequential=False)
    assert "singular" not in next(d for d in graph_pass.report if d.name == "fc0_weight").note


# -- SparseGPT's linear algebra, in place ------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 600), reverse=st.booleans(), seed=st.integers(0, 2**16))
def test_in_place_factorisations_equal_numpy_on_any_size(n, reverse, seed):
    """Sizes across the panel width (256) and reversed views, as SparseGPT factors them."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + 3, n))
    a = x.T @ x / n + 0.1 * np.eye(n)
    work = a.astype(np.float32)
    view = work[::-1, ::-1] if reverse else work
    target = a[::-1, ::-1] if reverse else a
    factor = np.linalg.cholesky(target)
    data_aware.cholesky_in_place(view)
    scale = np.abs(factor).max()
    np.testing.assert_allclose(view, factor, rtol=1e-3, atol=1e-4 * scale)
    assert not np.triu(view, 1).any()
    inverse = np.linalg.inv(factor)
    data_aware.invert_lower_in_place(view)
    np.testing.assert_allclose(view, inverse, rtol=1e-3, atol=1e-3 * np.abs(inverse).max())
    assert not np.triu(view, 1).any()


def test_the_inverse_factor_factors_the_damped_inverse():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 300)) * rng.lognormal(0, 1, 300)  # uneven column scales
    h = (x.T @ x / 500).astype(np.float32)
    damped = h.astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(300)
    u = data_aware._inverse_factor_in_place(h, 0.01)
    assert not np.tril(u, -1).any()  # upper triangular
    inverse = np.linalg.inv(damped)
    got = u.astype(np.float64).T @ u
    np.testing.assert_allclose(got, inverse, rtol=1e-3, atol=1e-4 * np.abs(inverse).max())


def test_sequential_statistics_equal_a_full_run_on_the_same_program():
    """`collect_at` (a cursor moved to the consumer, then a probe) sees what a full run does."""
    prog = programs.transformer_block()
    name = next(iter(prog.functions["main"].inputs))
    rng = np.random.default_rng(0)
    cal = [{name: rng.standard_normal((1, 8, 64)).astype(np.float32)} for _ in range(3)]
    ops = {o.name: o for o in prog.functions["main"].operations}
    cursor = Cursor(prog, cal)
    for layer in ("attn_q", "attn_out", "ff1", "ff2"):
        op = ops[layer]
        targets = {id(op): (layer, calibration.columns_of(op, "weight"))}
        full = calibration.collect(prog, cal, targets, with_xtx=True)[layer]
        seq = calibration.collect_at(cursor, targets, [op], with_xtx=True)[layer]
        assert (seq.rows, seq.samples) == (full.rows, full.samples) == (24, 3)
        np.testing.assert_array_equal(seq.sq, full.sq)
        np.testing.assert_array_equal(seq.xtx, full.xtx)


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_calibration_that_overflows_inside_the_model_is_refused(
    tmp_path, save_program, capsys, criterion
):
    """Finding 8: float32 inputs of 1e30 pass the finiteness check but overflow in an fp16
    model; wanda pruned with NaN-ranked scores (exit 0), sparsegpt left every weight dense as
    "sparse form would be larger". Non-finite statistics are a ConfigError naming the weight and
    the sample, with no numpy RuntimeWarning before it (finding 14)."""
    path = save_program(programs.mlp(sizes=(64, 256, 10), dtype=np.float16))
    cal = [{"x": np.ones((2, 64), np.float32)}, {"x": np.full((2, 64), 1e30, np.float32)}]
    config = {"spec": "2:4", "criterion": criterion, "min_size": 512}
    with pytest.raises(ConfigError, match=r"weight 'fc0_weight'.*calibration sample 1.*not finite"):
        ms.compress(path, config, calibration=cal)
    npz = tmp_path / "cal.npz"
    np.savez(npz, x=np.stack([s["x"] for s in cal]))
    out = tmp_path / "o.mlpackage"
    args = ["compress", str(path), "-o", str(out), "--prune", "2:4", "--criterion", criterion,
            "--min-size", "512", "--calibration", str(npz)]  # fmt: skip
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning would end it with exit 3
        assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("milsparse: error: ") and err.count("\n") == 1, err  # no warnings
    assert "fc0_weight" in err and "calibration sample 1" in err
    assert not out.exists()


def test_finite_activations_whose_x_t_x_overflows_are_refused(save_program):
    """Finding 8: activations of 1e20 are finite, but X^T X (float32) overflows: sparsegpt
    must not run on inf statistics."""
    path = save_program(programs.mlp(sizes=(64, 256, 10)))
    cal = [{"x": np.ones((2, 64), np.float32)}, {"x": np.full((2, 64), 1e20, np.float32)}]
    config = {"spec": "2:4", "criterion": "sparsegpt", "min_size": 512}
    with pytest.raises(ConfigError, match=r"weight 'fc0_weight'.*calibration sample 1.*X\^T X"):
        ms.compress(path, config, calibration=cal)


@pytest.mark.parametrize(
    "extra", [{"criterion": "sparsegpt"}, {"allocate": "global", "spec": "unstructured:0.5"}]
)
def test_huge_weights_raise_no_numpy_warnings(extra):
    """Finding 14: weights near float32's limit made sparsegpt's scores (w^2) and the
    allocation's error energies (W H W^T) overflow, with RuntimeWarnings on stderr (and NaN
    errors for the allocation to rank)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 128)) * 1e37).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 128))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=mb.const(val=w, name="w"), name="y")

    cal = [{"x": rng.standard_normal((2, 128)).astype(np.float32)} for _ in range(4)]
    config = parse_prune_config({"spec": "unstructured:0.5", "min_size": 1, **extra})
    graph_pass = PruneWeights(config, RunContext(calibration=calibration.check_samples(prog, cal)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph_pass(prog)
    if "allocate" in extra:
        assert all(np.isfinite(c.errors).all() for c in graph_pass.allocation)


def test_global_allocation_reaches_the_grid_s_last_point_despite_per_layer_rounding():
    """`allocate global` at 0.9 (and budget's first try, 0.9) failed: two layers of 6 hold
    5 + 5 zeros at 0.9 each, while 0.9 of the 12 together rounds to 11."""
    from milsparse.passes.allocate import GRID, Curve, global_allocation

    curves = [Curve(n, 6, [0.1 * i for i in range(len(GRID))]) for n in ("a", "b")]
    chosen = global_allocation(curves, 0.9)
    assert [masks.round_half_up(chosen[n] * 6) for n in "ab"] == [5, 5]  # the most there are
    with pytest.raises(ValueError, match="needs more than 0.9"):
        global_allocation(curves, 0.95)


def test_allocate_budget_runs_on_the_bundled_example(tmp_path):
    """The docs' budget example failed with the rounding error above on its first try."""
    from pathlib import Path

    import milsparse.fixtures

    example = Path(milsparse.fixtures.__file__).with_name("example.mlpackage")
    prog = ms.load_program(example)
    shape = tuple(prog.functions["main"].inputs["x"].shape)
    cal = [{"x": np.random.default_rng(i).standard_normal(shape).astype(np.float32)}
           for i in range(4)]  # fmt: skip
    config = {"spec": "unstructured:0.5", "allocate": "budget", "min_cosine": 0.9}
    _, report = ms.compress_with_report(example, config, calibration=cal)
    assert any(n.startswith("allocate budget: overall sparsity") for n in report.notes)


def test_allocation_does_not_depend_on_the_activations_scale(save_program):
    """Loud calibration inputs (3e17 here, fine in float32) made W H W^T overflow: the layer's
    energy became inf, every error 0, and numpy warned on stderr. The errors are relative, so
    they are measured with X^T X scaled to at most 1: the same choice at any input scale, in
    silence."""
    model = save_program(programs.mlp(sizes=(64, 128, 10), dtype=np.float32))
    rng = np.random.default_rng(0)
    base = [{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(4)]
    recipe = {"prune": {"spec": "unstructured:0.5", "allocate": "global", "min_size": 16}}
    chosen = []
    for scale in (1.0, 3e17):
        cal = [{"x": (scale * s["x"]).astype(np.float32)} for s in base]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, report = ms.compress_with_report(model, recipe, calibration=cal)
        chosen.append({k: v["chosen"] for k, v in report.allocation.items()})
        assert all(max(v["error"]) > 0 for v in report.allocation.values())
    assert chosen[0] == chosen[1]


def test_global_allocation_gives_a_weight_holding_nan_no_share_of_the_budget(save_program):
    """Review finding: allocation measured curves on a weight the template then leaves dense
    (non-finite); its NaN energy made every error 0, so it took the largest sparsity and the
    others too little. It is now left out of the allocation, and the others reach the target."""
    prog = programs.mlp(sizes=(64, 128, 128, 10), dtype=np.float32)
    (last,) = [op for op in prog.functions["main"].find_ops(op_type="const")
               if op.name == "fc2_weight"]  # fmt: skip
    last.outputs[0].val[3, 3] = np.nan  # the builder's own array
    model = save_program(prog)
    rng = np.random.default_rng(0)
    cal = [{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(4)]
    recipe = {"prune": {"spec": "unstructured:0.5", "allocate": "global", "min_size": 16}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = ms.compress_with_report(model, recipe, calibration=cal)
    rows = {d.name: d for d in report.decisions}
    assert rows["fc2_weight"].reason == "non-finite values (inf or nan)"
    assert set(report.allocation) == {"fc0_weight", "fc1_weight"}
    pruned = [rows[n] for n in ("fc0_weight", "fc1_weight")]
    size = [np.prod(d.shape) for d in pruned]
    overall = sum(d.sparsity * n for d, n in zip(pruned, size, strict=True)) / sum(size)
    assert overall == pytest.approx(0.5, abs=0.01)
