"""milsparse.coreml: coremltools' compression functions and configs, milsparse's passes. The
drop-in gives the same package as the native API for equivalent settings; unsupported options
are named; joint_compression chains onto already compressed weights."""

import hashlib
from pathlib import Path

import coremltools.optimize.coreml as cto
import numpy as np
import pytest
from milsparse.fixtures import programs
from milsparse.ir.chain import weight_chain

import milsparse as ms
from milsparse import coreml as drop
from milsparse.errors import ConfigError


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    path = tmp_path_factory.mktemp("dropin") / "block.mlpackage"
    prog = programs.transformer_block(d_model=128, heads=4, d_ff=256, dtype=np.float16)
    programs.program_to_mlmodel(prog).save(str(path))
    return path


def _blob(model) -> str:
    data = Path(model.package_path, "Data/com.apple.CoreML/weights/weight.bin").read_bytes()
    return hashlib.sha256(data).hexdigest()


def _formats(model) -> dict[str, str]:
    return {r.name: r.format for r in ms.inspect_model(model).rows if r.name.endswith("weight")}


# coremltools compresses weights with more elements than weight_threshold; milsparse's
# min_size counts from the size itself, hence the + 1.
@pytest.mark.parametrize(
    "function, op_config, native",
    [
        (drop.prune_weights, cto.OpMagnitudePrunerConfig(n_m_ratio=(2, 4)), "2:4@in"),
        (drop.prune_weights, cto.OpMagnitudePrunerConfig(n_m_ratio=(1, 4), dim=0), "1:4@out"),
        (drop.prune_weights, cto.OpMagnitudePrunerConfig(target_sparsity=0.6), "unstructured:0.6"),
        (
            drop.prune_weights,
            cto.OpMagnitudePrunerConfig(target_sparsity=0.5, block_size=4),
            "block4@out:0.5",
        ),
        (
            drop.prune_weights,
            cto.OpThresholdPrunerConfig(threshold=0.02, minimum_sparsity_percentile=0.1),
            {"pattern": "threshold", "threshold": 0.02, "min_sparsity": 0.1},
        ),
        (drop.palettize_weights, cto.OpPalettizerConfig(nbits=4, mode="kmeans"), "lut4"),
        (
            drop.palettize_weights,
            cto.OpPalettizerConfig(
                nbits=2,
                mode="kmeans",
                granularity="per_grouped_channel",
                group_size=16,
                cluster_dim=2,
                num_kmeans_workers=4,
            ),
            "lut2x2@g16",
        ),  # fmt: skip
        (drop.palettize_weights, cto.OpPalettizerConfig(nbits=6, mode="uniform"), "lut6:uniform"),
        (
            drop.palettize_weights,
            cto.OpPalettizerConfig(
                nbits=4, granularity="per_grouped_channel", group_size=16, channel_axis=1
            ),
            "lut4@g16@axis1",
        ),
        (
            drop.palettize_weights,
            cto.OpPalettizerConfig(nbits=4, enable_per_channel_scale=True),
            "lut4@pcs",
        ),
        (drop.linear_quantize_weights, cto.OpLinearQuantizerConfig(), "int8"),
        (
            drop.linear_quantize_weights,
            cto.OpLinearQuantizerConfig(
                mode="linear", dtype="uint4", granularity="per_block", block_size=16
            ),
            "uint4@b16:affine",
        ),
        (
            drop.linear_quantize_weights,
            cto.OpLinearQuantizerConfig(dtype="int8", granularity="per_tensor"),
            "int8@t",
        ),
        (
            drop.linear_quantize_weights,
            cto.OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=[1, 32]),
            "int4@b32",
        ),
        (
            drop.linear_quantize_weights,
            cto.OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=[0, 32]),
            "int4@b0x32",
        ),
        (
            drop.linear_quantize_weights,
            cto.OpLinearQuantizerConfig(dtype="int8", granularity="per_block", block_size=0),
            "int8",
        ),
    ],
)
def test_the_drop_in_gives_the_native_package(block, function, op_config, native):
    ours = function(str(block), cto.OptimizationConfig(global_config=op_config))
    kind = ms.Recipe.coerce(native if isinstance(native, str) else {"spec": native}).steps[0].kind
    expected = ms.compress(block, ms.Recipe([ms.Step(kind, {"spec": native, "min_size": 2049})]))
    assert _blob(ours) == _blob(expected)
    assert _formats(ours) == _formats(expected)
    assert set(_formats(ours).values()) - {"dense"}  # something was compressed


def test_op_type_and_op_name_configs_resolve_per_weight_in_coremltools_order(block):
    config = cto.OptimizationConfig(
        global_config=cto.OpMagnitudePrunerConfig(n_m_ratio=(2, 4)),
        op_type_configs={"linear": cto.OpMagnitudePrunerConfig(target_sparsity=0.5)},
        op_name_configs={
            "attn_q": cto.OpMagnitudePrunerConfig(n_m_ratio=(3, 4)),  # a consumer's name
            "ff1_weight": None,  # a const's name: left alone
        },
    )
    ours = drop.prune_weights(str(block), config)
    expected = ms.compress(
        block,
        {
            "spec": "unstructured:0.5",
            "min_size": 2049,
            "overrides": {"attn_q_weight": "3:4", "ff1_weight": "dense"},
        },
    )
    assert _blob(ours) == _blob(expected)
    formats = _formats(ours)
    assert formats["ff1_weight"] == "dense" and formats["attn_k_weight"] == "sparse"


@pytest.mark.parametrize(
    "function, op_config, message",
    [
        (drop.palettize_weights, cto.OpLinearQuantizerConfig(), "takes OpPalettizerConfig"),
        (drop.prune_weights, cto.OpPalettizerConfig(nbits=4), "takes OpMagnitudePrunerConfig"),
    ],
)
def test_unsupported_options_are_named(block, function, op_config, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        function(str(block), cto.OptimizationConfig(global_config=op_config))
    with pytest.raises(ConfigError, match="must be a coremltools OptimizationConfig"):
        function(str(block), op_config)


def test_joint_compression_prunes_palettized_weights_keeping_their_values(block):
    palettized = drop.palettize_weights(
        str(block), cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=4))
    )
    prune = cto.OptimizationConfig(global_config=cto.OpMagnitudePrunerConfig(n_m_ratio=(2, 4)))
    kept = drop.prune_weights(palettized, prune)  # joint_compression=False: left as they are
    assert set(_formats(kept).values()) == {"lut4"}
    joint = drop.prune_weights(palettized, prune, joint_compression=True)
    assert set(_formats(joint).values()) == {"sparse+lut4"}
    before = {o.name: o for o in ms.load_program(palettized).functions["main"].operations}
    for op in ms.load_program(joint).functions["main"].operations:
        chain = weight_chain(op)
        if chain is None or chain.label != "sparse+lut4":
            continue
        was = weight_chain(before[op.name]).decode()
        now = chain.decode()
        nonzero = now != 0
        np.testing.assert_array_equal(now[nonzero], was[nonzero])  # bit-identical kept values
        assert nonzero.mean() == pytest.approx(0.5, abs=0.01)
    # and the other order: sparse, then palettized or quantized jointly
    sparse = drop.prune_weights(str(block), prune)
    lut = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=4))
    assert set(_formats(drop.palettize_weights(sparse, lut)).values()) == {"sparse"}
    joint = drop.palettize_weights(sparse, lut, joint_compression=True)
    assert set(_formats(joint).values()) == {"sparse+lut4"}
    int8 = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig())
    joint = drop.linear_quantize_weights(sparse, int8, joint_compression=True)
    assert set(_formats(joint).values()) == {"sparse+int8"}


def _ios(prog_target, tmp_path, name="m.mlpackage"):
    path = tmp_path / name
    prog = programs.mlp(sizes=(64, 128, 128, 10), dtype=np.float16, opset=prog_target)
    programs.program_to_mlmodel(prog).save(str(path))
    return path


def test_ios18_only_configs_below_ios18_raise_coremltools_value_errors(tmp_path):
    """coremltools refuses what needs iOS18 on an older model with a ValueError its users
    match by its words; milsparse left those weights dense and said nothing."""
    import coremltools as ct

    older = _ios(ct.target.iOS17, tmp_path)
    refused = {
        "per_block quantization": (drop.linear_quantize_weights, cto.OpLinearQuantizerConfig(
            granularity="per_block", block_size=32)),
        "4-bit quantization": (drop.linear_quantize_weights,
                               cto.OpLinearQuantizerConfig(dtype="int4")),
        "per_grouped_channel palettization": (drop.palettize_weights, cto.OpPalettizerConfig(
            nbits=4, granularity="per_grouped_channel", group_size=16)),
        "vector palettization": (drop.palettize_weights,
                                 cto.OpPalettizerConfig(nbits=4, cluster_dim=2)),
    }  # fmt: skip
    for what, (function, op_config) in refused.items():
        with pytest.raises(ValueError, match=f"The {what} is supported since iOS18. Please "
                           "re-convert your model with minimum_deployment_target set to at "
                           "least ct.target.iOS18."):  # fmt: skip
            function(str(older), cto.OptimizationConfig(global_config=op_config))
    pruned = drop.prune_weights(str(older), cto.OptimizationConfig(
        global_config=cto.OpMagnitudePrunerConfig(target_sparsity=0.5)))  # fmt: skip
    with pytest.raises(ValueError, match="^Joint compression is only supported since iOS18"):
        drop.palettize_weights(pruned, cto.OptimizationConfig(
            global_config=cto.OpPalettizerConfig(nbits=4)), joint_compression=True)  # fmt: skip
    # the same configs compress an iOS18 model
    newer = _ios(ct.target.iOS18, tmp_path, "new.mlpackage")
    for function, op_config in refused.values():
        model = function(str(newer), cto.OptimizationConfig(global_config=op_config))
        assert model._mil_program is not None  # coremltools' results carry it; its tests read it
        assert len(ms.inspect_model(model).rows) >= 2


def test_unique_and_custom_palettization(tmp_path):
    """mode unique: the weight's distinct values, with the fewest bits that hold them, exactly;
    a weight with more than 256 stays dense with coremltools' warning. mode custom: the user's
    lut_function gives each table and its indices."""
    import logging

    import coremltools as ct

    prog = programs.mlp(sizes=(64, 128, 128, 10), dtype=np.float16, opset=ct.target.iOS18)
    rng = np.random.default_rng(0)
    consts = {op.name: op for op in prog.functions["main"].find_ops(op_type="const")}
    few = rng.choice(np.array([-0.5, -0.25, 0.125, 0.5, 1.0], np.float16), (128, 64))
    consts["fc0_weight"].outputs[0].val[...] = few  # 5 distinct values: 3 bits
    path = tmp_path / "few.mlpackage"
    programs.program_to_mlmodel(prog).save(str(path))
    unique = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="unique"))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("milsparse.coreml").addHandler(handler)
    try:
        model = drop.palettize_weights(str(path), unique)
    finally:
        logging.getLogger("milsparse.coreml").removeHandler(handler)
    rows = {r.name: r for r in ms.inspect_model(model).rows}
    assert rows["fc0_weight"].format == "lut3"
    (lut_op,) = model._mil_program.functions["main"].find_ops(op_type="constexpr_lut_to_dense")
    np.testing.assert_array_equal(lut_op.materialized_val_inference(), few)  # lossless
    assert rows["fc1_weight"].format == "dense"  # 16384 random values
    assert any("fc1_weight" in r.getMessage() and "cannot be represented by 8 bits" in
               r.getMessage() for r in records)  # fmt: skip

    def lut_function(values):
        table = np.array([-1.0, 0.0, 1.0, 2.0], values.dtype)
        return table, np.abs(values.ravel()[:, None] - table).argmin(1).astype(np.uint8)

    custom = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
        mode="custom", lut_function=lut_function, weight_threshold=1300))  # fmt: skip
    model = drop.palettize_weights(str(path), custom)
    ops = model._mil_program.functions["main"].find_ops(op_type="constexpr_lut_to_dense")
    assert len(ops) == 2
    for op in ops:
        assert set(np.unique(op.materialized_val_inference())) <= {-1.0, 0.0, 1.0}
    with pytest.raises(ConfigError, match="lut_function returned a table of shape"):
        bad = cto.OpPalettizerConfig(
            mode="custom", lut_function=lambda v: (np.zeros((2, 2)), np.zeros(v.size))
        )
        drop.palettize_weights(str(path), cto.OptimizationConfig(global_config=bad))


@pytest.mark.parametrize(
    "steps",
    [
        [("prune", cto.OpMagnitudePrunerConfig(target_sparsity=0.5))],
        [("palettize", cto.OpPalettizerConfig(nbits=4))],
        [
            (
                "quantize",
                cto.OpLinearQuantizerConfig(dtype="int4", granularity="per_block", block_size=32),
            )
        ],  # fmt: skip
        [
            ("prune", cto.OpMagnitudePrunerConfig(n_m_ratio=(2, 4))),
            ("palettize", cto.OpPalettizerConfig(nbits=4)),
        ],
        [
            ("prune", cto.OpMagnitudePrunerConfig(target_sparsity=0.5)),
            ("quantize", cto.OpLinearQuantizerConfig(dtype="int8")),
        ],
    ],  # fmt: skip
    ids=["sparse", "lut4", "int4", "sparse+lut4", "sparse+int8"],
)
def test_decompress_and_metadata_of_every_form(tmp_path, steps):
    """decompress_weights gives each compressed weight back as a const of exactly what it
    decoded to (coremltools' materialized_val_inference and milsparse's interpreter agree);
    get_weights_metadata lists coremltools' consts and, beyond it, the compressed weights."""
    import coremltools as ct
    from milsparse.ir.interpreter import evaluate_program

    functions = {"prune": drop.prune_weights, "palettize": drop.palettize_weights,
                 "quantize": drop.linear_quantize_weights}  # fmt: skip
    model = str(_ios(ct.target.iOS18, tmp_path))
    for i, (kind, op_config) in enumerate(steps):
        config = cto.OptimizationConfig(global_config=op_config)
        model = functions[kind](model, config, joint_compression=i > 0)
    prog = model._mil_program
    roots = {}
    for op in prog.functions["main"].operations:
        chain = weight_chain(op)
        if chain is not None and chain.ops:
            roots[op.name] = (op.materialized_val_inference(), chain.label)
            if isinstance(roots[op.name][0], tuple):
                roots[op.name] = (roots[op.name][0][-1], chain.label)
    assert roots
    metadata = drop.get_weights_metadata(model, weight_threshold=1000)
    dense = drop.decompress_weights(model)
    plain = {op.name: op for op in dense._mil_program.functions["main"].operations}
    assert not any(op.op_type.startswith("constexpr_") for op in plain.values())
    for name, (value, label) in roots.items():
        assert plain[name].op_type == "const" and plain[name].outputs[0].val.dtype == np.float16
        np.testing.assert_array_equal(plain[name].outputs[0].val, value)
        entry = metadata[name]
        assert isinstance(entry, cto.CoreMLWeightMetaData) and entry.form == label
        np.testing.assert_array_equal(entry.val, value)
        assert 0 < entry.bits_per_weight < 16
        assert entry.child_ops[0].op_type == "linear"
        assert entry.child_ops[0].params_name_mapping["weight"] == name
    x = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)}
    for got, want in zip(evaluate_program(dense._mil_program, x).values(),
                         evaluate_program(prog, x).values(), strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)


def test_group_size_0_is_one_table_of_every_channel_and_multifunction_models_compress(tmp_path):
    """coremltools reads group_size 0 as the whole channel axis (it refused with "group_size
    must be an integer >= 1"); and every drop-in function takes multifunction packages, which
    coremltools refuses."""
    import coremltools as ct

    newer = _ios(ct.target.iOS18, tmp_path)
    grouped = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
        nbits=4, granularity="per_grouped_channel", group_size=0))  # fmt: skip
    per_tensor = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(nbits=4))
    assert _blob(drop.palettize_weights(str(newer), grouped)) == _blob(
        drop.palettize_weights(str(newer), per_tensor)
    )
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(newer), "main", "first")
    desc.add_function(str(_ios(ct.target.iOS18, tmp_path, "b.mlpackage")), "main", "second")
    desc.default_function_name = "first"
    multi = tmp_path / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(multi))
    calls = {
        drop.prune_weights: cto.OpMagnitudePrunerConfig(target_sparsity=0.5),
        drop.palettize_weights: cto.OpPalettizerConfig(nbits=4),
        drop.linear_quantize_weights: cto.OpLinearQuantizerConfig(dtype="int8"),
    }
    for function, op_config in calls.items():
        model = function(str(multi), cto.OptimizationConfig(global_config=op_config))
        assert set(model._mil_program.functions) == {"first", "second"}
        rows = ms.inspect_model(model).rows
        assert {r.function for r in rows if r.format != "dense"} == {"first", "second"}
    dense = drop.decompress_weights(model)
    assert not [op for f in dense._mil_program.functions.values() for op in f.operations
                if op.op_type.startswith("constexpr_")]  # fmt: skip
    assert drop.get_weights_metadata(model, weight_threshold=1000)
