"""The declarations of passes: `PassSpec`, and those of milsparse's own three passes.

Data only, importable without coremltools (which imports torch: seconds), so `milsparse
passes` lists the passes at once. Each pass class registers its declaration beside itself
(`@graph_pass(catalog.PRUNE)` in `passes/prune.py`), with coremltools and with milsparse's
registry in one step; `passes/registry.py` orders the registered passes.

Targets are given by name here ("iOS18"); the registry turns them into coremltools'
`AvailableTarget` when a pass registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from milsparse.ir.errors import PipelineError
from milsparse.ir.states import WEIGHT_STATES

__all__ = ["PassSpec", "WEIGHT_STATES", "PRUNE", "PALETTIZE", "QUANTIZE", "OWN_PASSES"]


@dataclass(frozen=True)
class PassSpec:
    """What a pass declares (see `passes/registry.py` for how each field orders it).

    `min_target` and the third item of each `transforms` entry are targets: coremltools'
    `AvailableTarget` (`ct.target.iOS18`) or its name ("iOS18")."""

    name: str
    summary: str
    requires: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    min_target: object = "iOS16"
    options: tuple[str, ...] = field(default=("config",))
    transforms: tuple[tuple[str, str, object], ...] = ()

    def __post_init__(self):
        namespace, _, short = self.name.partition("::")
        if not namespace or not short:
            raise PipelineError(f"a pass is named namespace::name, got {self.name!r}")
        for consumed, produced, _ in self.transforms:
            for state in (consumed, produced):
                if state not in WEIGHT_STATES:
                    raise PipelineError(
                        f"{self.name}: unknown weight state {state!r}; known: "
                        f"{', '.join(WEIGHT_STATES)}"
                    )

    @property
    def consumes(self) -> tuple[str, ...]:
        return tuple(c for c, _, _ in self.transforms)


def target_name(target) -> str:
    """ "iOS18" for `AvailableTarget.iOS18` or "iOS18"."""
    return getattr(target, "name", target)


# Pruning must see the final weights: after fusions fold batchnorm/bias/scale into them, after
# the fp16 cast is folded, and after constants are deduplicated (tied weights).
_FINAL_WEIGHTS = (
    "common::fuse_conv_batchnorm",
    "common::fuse_conv_bias",
    "common::fuse_conv_scale",
    "common::fuse_linear_bias",
    "common::fuse_matmul_weight_bias",
    "common::add_fp16_cast",
    "common::const_elimination",
    "common::const_deduplication",
    "common::cast_optimization",
)

PRUNE = PassSpec(
    name="milsparse::prune",
    summary="prune weight consts into constexpr_sparse_to_dense (threshold, magnitude, block, n:m)",
    after=_FINAL_WEIGHTS,
    min_target="iOS16",
    transforms=(
        ("dense", "sparse", "iOS16"),
        ("palettized", "sparse+palettized", "iOS18"),
        ("quantized", "sparse+quantized", "iOS18"),
    ),
)

# Palettize and quantize are not ordered against prune: both orders are valid (the joint form
# either way), so a pipeline keeps the order the recipe asks for.
PALETTIZE = PassSpec(
    name="milsparse::palettize",
    summary="palettize dense weight consts into constexpr_lut_to_dense (k-means or uniform "
    "tables, per tensor or per grouped channel)",
    after=_FINAL_WEIGHTS,
    min_target="iOS16",
    transforms=(
        ("dense", "palettized", "iOS16"),
        ("sparse", "sparse+palettized", "iOS18"),
    ),
)

QUANTIZE = PassSpec(
    name="milsparse::quantize",
    summary="linearly quantize weight consts (int8/uint8/int4/uint4, per tensor, channel or "
    "block) into constexpr_blockwise_shift_scale or constexpr_affine_dequantize",
    after=_FINAL_WEIGHTS,
    min_target="iOS16",
    transforms=(
        ("dense", "quantized", "iOS16"),
        ("sparse", "sparse+quantized", "iOS18"),
        ("palettized", "palettized", "iOS18"),  # the table quantized to int8
    ),
)

OWN_PASSES = {spec.name: spec for spec in (PRUNE, PALETTIZE, QUANTIZE)}
