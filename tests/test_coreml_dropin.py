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
        (
            drop.palettize_weights,
            cto.OpPalettizerConfig(nbits=4, enable_per_channel_scale=True),
            "enable_per_channel_scale",
        ),
        (drop.palettize_weights, cto.OpPalettizerConfig(mode="unique"), "mode='unique'"),
        (drop.palettize_weights, cto.OpPalettizerConfig(nbits=4, channel_axis=1), "channel_axis"),
        (
            drop.linear_quantize_weights,
            cto.OpLinearQuantizerConfig(granularity="per_block", block_size=[1, 8]),
            "block_size=[1, 8] per axis",
        ),
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
