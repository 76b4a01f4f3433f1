"""Drop-in replacements for coremltools' `ct.optimize.coreml` weight compression functions.

    from coremltools.optimize.coreml import OpMagnitudePrunerConfig, OptimizationConfig
    from milsparse.coreml import prune_weights          # was: from coremltools.optimize.coreml

    config = OptimizationConfig(global_config=OpMagnitudePrunerConfig(n_m_ratio=(2, 4)))
    sparse = prune_weights(mlmodel, config)

`decompress_weights` and `get_weights_metadata` (milsparse.coreml.metadata) are coremltools'
too, the metadata of compressed weights added.

`prune_weights`, `palettize_weights` and `linear_quantize_weights` take coremltools' own
`OptimizationConfig` (global, per op type and per op name configs, resolved per weight in
coremltools' order: the const's name, then its consumer's name, then its consumer's type, then
the global config) and `joint_compression=`, and return an `MLModel`. They run milsparse's
passes (`milsparse.compress` with one step whose overrides name every weight), so the results
follow milsparse's rules; docs/coremltools-dropin.md lists where they differ from
coremltools'. Options milsparse does not support raise `ConfigError` naming them.
"""

from __future__ import annotations

import enum
import logging
import re
from typing import Any

import attrs
import coremltools as ct
from coremltools.converters.mil.mil import types
from coremltools.optimize.coreml import (
    OpLinearQuantizerConfig,
    OpMagnitudePrunerConfig,
    OpPalettizerConfig,
    OpThresholdPrunerConfig,
    OptimizationConfig,
)

from milsparse import package, staging
from milsparse.coreml.metadata import get_weights_metadata
from milsparse.errors import ConfigError
from milsparse.ir.chain import Form, weight_chain
from milsparse.ir.graph import walk_ops
from milsparse.passes.lut_config import PalettizeConfig, PalettizeSpec
from milsparse.passes.prune_config import PruneConfig, parse_prune_spec
from milsparse.passes.quant_config import QuantizeConfig, QuantizeSpec
from milsparse.recipe import Recipe, Step

__all__ = [
    "prune_weights",
    "palettize_weights",
    "linear_quantize_weights",
    "decompress_weights",
    "get_weights_metadata",
    "recipe_of",
]

_log = logging.getLogger("milsparse.coreml")
_STRUCTURED_OPS = ("linear", "conv")  # coremltools prunes n:m and blocks of these only


def _name(value) -> str:
    """An option coremltools may hold as an Enum (CompressionGranularity) or a string."""
    return (value.name if isinstance(value, enum.Enum) else str(value)).lower()


def _repr(x: float) -> str:
    return repr(float(x))


def _axis(dim: int) -> str:
    return "out" if dim == 0 else "in"


def _prune_spec(config):
    if isinstance(config, OpThresholdPrunerConfig):
        spec = parse_prune_spec(f"threshold:{_repr(config.threshold)}")
        return attrs.evolve(spec, min_sparsity=float(config.minimum_sparsity_percentile))
    if not isinstance(config, OpMagnitudePrunerConfig):
        raise ConfigError(
            f"prune_weights takes OpMagnitudePrunerConfig or OpThresholdPrunerConfig, got "
            f"{type(config).__name__}"
        )
    if config.n_m_ratio is not None:
        n, m = config.n_m_ratio
        return parse_prune_spec(f"{n}:{m}@{_axis(config.dim)}")
    if config.block_size is not None:
        return parse_prune_spec(
            f"block{config.block_size}@{_axis(config.dim)}:{_repr(config.target_sparsity)}"
        )
    return parse_prune_spec(f"unstructured:{_repr(config.target_sparsity)}")


def _structured(config) -> bool:
    return isinstance(config, OpMagnitudePrunerConfig) and (
        config.n_m_ratio is not None or config.block_size is not None
    )


def _palettize_spec(config):
    if not isinstance(config, OpPalettizerConfig):
        raise ConfigError(
            f"palettize_weights takes OpPalettizerConfig, got {type(config).__name__}"
        )
    mode = _name(config.mode)
    granularity = _name(config.granularity)
    group_size = config.group_size
    if granularity == "per_grouped_channel" and group_size == 0:
        granularity, group_size = "per_tensor", 32  # coremltools: 0 groups every channel
    try:
        return PalettizeSpec(
            nbits=config.nbits,
            mode=mode,
            lut_function=config.lut_function,
            channel_axis=config.channel_axis,
            per_channel_scale=bool(config.enable_per_channel_scale),
            granularity=granularity,
            group_size=group_size,
            cluster_dim=config.cluster_dim,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"OpPalettizerConfig: {e}") from e


def _dtype_name(config: OpLinearQuantizerConfig) -> str:
    """ "int8", ...: coremltools holds the dtype as a string or a MIL type."""
    return config.dtype if isinstance(config.dtype, str) else types.builtin_to_string(config.dtype)


def _quantize_spec(config):
    if not isinstance(config, OpLinearQuantizerConfig):
        raise ConfigError(
            f"linear_quantize_weights takes OpLinearQuantizerConfig, got {type(config).__name__}"
        )
    dtype = _dtype_name(config)
    granularity = _name(config.granularity)
    block_size, block_shape = config.block_size, None
    if granularity == "per_block" and not isinstance(block_size, int):
        block_size, block_shape = 32, tuple(block_size)  # a block per axis, 0 the whole axis
    elif granularity == "per_block" and block_size == 0:
        granularity = "per_channel"  # coremltools: the whole input axis, per output channel
    try:
        return QuantizeSpec(
            dtype=dtype,
            mode=_name(config.mode),
            granularity=granularity,
            block_size=block_size if isinstance(block_size, int) and block_size > 0 else 32,
            block_shape=block_shape,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"OpLinearQuantizerConfig: {e}") from e


_RECONVERT = (
    "Please re-convert your model with minimum_deployment_target set to at least ct.target.iOS18."
)


def _ios18_only(kind: str, config) -> str | None:
    """coremltools' refusal of `config` on a model below iOS18 (its wording: its users match
    it), or None when the config works there."""
    if kind == "quantize":
        dtype = _dtype_name(config)
        if _name(config.granularity) == "per_block":
            return f"The per_block quantization is supported since iOS18. {_RECONVERT}"
        if dtype in ("int4", "uint4"):
            return f"The 4-bit quantization is supported since iOS18. {_RECONVERT}"
    if kind == "palettize":
        if _name(config.granularity) == "per_grouped_channel":
            return f"The per_grouped_channel palettization is supported since iOS18. {_RECONVERT}"
        if config.cluster_dim > 1:
            return f"The vector palettization is supported since iOS18. {_RECONVERT}"
        if config.enable_per_channel_scale:
            return (
                "Palettization with per-channel-scale is only supported since iOS18. Please set "
                "minimum_deployment_target accordingly."
            )
    return None


_KINDS = {
    "prune": (_prune_spec, PruneConfig, frozenset({Form.PALETTIZED, Form.QUANTIZED})),
    "palettize": (_palettize_spec, PalettizeConfig, frozenset({Form.SPARSE})),
    "quantize": (_quantize_spec, QuantizeConfig, frozenset({Form.SPARSE, Form.PALETTIZED})),
}


def _escape(name: str) -> str:
    """`name` as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _config_for(op, uses, config: OptimizationConfig):
    """coremltools' order: the const's name, then each consumer's name, type, the global."""
    if op.name in config.op_name_configs:
        return op.name, config.op_name_configs[op.name]
    found = []
    for use in uses:
        if use.name in config.op_name_configs:
            found.append(config.op_name_configs[use.name])
        else:
            found.append(config.op_type_configs.get(use.op_type, config.global_config))
    if any(f != found[0] for f in found[1:]):
        raise ConfigError(
            f"compression config conflict for {op.name}: its readers "
            f"{', '.join(u.name for u in uses)} have different configs"
        )
    return None, (found[0] if found else None)


def recipe_of(prog, kind: str, config: OptimizationConfig, joint_compression: bool) -> Recipe:
    """The one-step milsparse recipe that does what `config` asks of `prog`'s weights: every
    weight gets an override with its own spec (or `dense`: left as it is)."""
    if not isinstance(config, OptimizationConfig):
        raise ConfigError(
            f"config must be a coremltools OptimizationConfig, got {type(config).__name__}"
        )
    to_spec, config_type, joint_forms = _KINDS[kind]
    opsets = [f.opset_version or ct.target.iOS15 for f in prog.functions.values()]
    ios18 = min(opsets) >= ct.target.iOS18
    if joint_compression and not ios18:
        raise ConfigError(f"Joint compression is only supported since iOS18. {_RECONVERT}")
    overrides: list[tuple[str, Any]] = []
    selected: list[str] = []
    default = None
    for func in prog.functions.values():
        for op in walk_ops(func):
            chain = weight_chain(op)
            if chain is None:
                continue
            uses = [c for c in op.outputs[0].child_ops if not c.op_type.startswith("constexpr_")]
            if not uses:
                continue
            _, chosen = _config_for(op, uses, config)
            spec = None
            if chosen is not None and chain.num_elements > (chosen.weight_threshold or 0):
                refusal = None if ios18 else _ios18_only(kind, chosen)
                if refusal is not None:
                    raise ConfigError(refusal)
                spec = to_spec(chosen)
                if kind == "prune" and _structured(chosen):
                    if any(u.op_type not in _STRUCTURED_OPS for u in uses):
                        spec = None  # as coremltools: n:m and blocks of linear and conv only
                if chain.form is not Form.DENSE and (
                    not joint_compression or chain.form not in joint_forms
                ):
                    spec = None  # already compressed: left as it is
            overrides.append((_escape(op.name), spec))
            if spec is not None:  # whatever reads it (an lstm, a gather), as coremltools
                selected.append(_escape(op.name))
            default = default or spec
    # configs' own specs are validated even when no weight takes them
    for c in (config.global_config, *config.op_type_configs.values(),
              *config.op_name_configs.values()):  # fmt: skip
        if c is not None:
            default = default or to_spec(c)
    if default is None:
        raise ConfigError("the OptimizationConfig has no compressor config")
    step = config_type(
        spec=default, overrides=tuple(overrides), op_names=tuple(selected), min_size=0
    )
    return Recipe([Step(kind, step)])


def _run(kind: str, mlmodel, config, joint_compression: bool) -> ct.models.MLModel:
    """The model compressed as `config` asks, loaded once; it carries its `_mil_program`, as
    coremltools' results do."""
    from milsparse.api import run_compress
    from milsparse.options import CompressOptions

    source = package.open_model(mlmodel)
    prog = package.load_program(source)
    recipe = recipe_of(prog, kind, config, joint_compression)
    compressed, report = run_compress(CompressOptions.build(source, recipe), prog)
    for d in report.decisions:  # as coremltools warns of the weights it skips
        if d.spec is not None and not d.compressed and d.is_weight:
            _log.warning("%s %s left as it is: %s", d.spec, d.name, d.reason)
    compressed._mil_program = package.load_program(compressed)
    return compressed


def prune_weights(
    mlmodel, config: OptimizationConfig, joint_compression: bool = False
) -> ct.models.MLModel:
    """`ct.optimize.coreml.prune_weights` with milsparse's pruning: OpMagnitudePrunerConfig
    (target_sparsity, block_size, n_m_ratio, dim) and OpThresholdPrunerConfig (threshold,
    minimum_sparsity_percentile); weight_threshold as coremltools (more elements than it).
    `joint_compression=True` prunes palettized or quantized iOS18 weights into the joint forms
    (their values bit-identical); otherwise such weights are left as they are."""
    return _run("prune", mlmodel, config, joint_compression)


def palettize_weights(
    mlmodel, config: OptimizationConfig, joint_compression: bool = False
) -> ct.models.MLModel:
    """`ct.optimize.coreml.palettize_weights` with milsparse's tables: OpPalettizerConfig
    (nbits, mode kmeans, uniform, unique or custom with lut_function, granularity, group_size,
    cluster_dim; num_kmeans_workers is accepted and has no effect). `joint_compression=True`
    palettizes the nonzeros of sparse weights into `constexpr_lut_to_sparse` (tables fitted on
    the nonzeros only)."""
    return _run("palettize", mlmodel, config, joint_compression)


def linear_quantize_weights(
    mlmodel, config: OptimizationConfig, joint_compression: bool = False
) -> ct.models.MLModel:
    """`ct.optimize.coreml.linear_quantize_weights` with milsparse's quantization:
    OpLinearQuantizerConfig (mode, dtype int8/uint8/int4/uint4, granularity, block_size as one
    int or one per axis). `joint_compression=True` quantizes the nonzeros of sparse weights
    into `constexpr_sparse_blockwise_shift_scale` (ranges from the nonzeros), and the tables of
    palettized weights to int8 (per tensor or per table)."""
    return _run("quantize", mlmodel, config, joint_compression)


def decompress_weights(mlmodel) -> ct.models.MLModel:
    """`ct.optimize.coreml.decompress_weights`: every compressed weight (any constexpr chain,
    the iOS18 joint forms included) back to a plain const of its decoded values, in its own
    dtype; multifunction models too. The decoded values are written to disk as they are made,
    not held in memory. The model carries its `_mil_program`."""
    from milsparse.ir.blobs import Spill
    from milsparse.passes.decompress import decompress_weights as decompress

    source = package.open_model(mlmodel)
    prog = package.load_program(source)
    with staging.spill_folder() as folder:
        decompress(prog, Spill(folder))
        model = package.program_to_model(prog, source.get_spec().specificationVersion, source)
        del prog
    model._mil_program = package.load_program(model)
    return model
