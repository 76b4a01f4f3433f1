"""MIL graph passes of milsparse, one per module, each registered with coremltools and here."""

from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from milsparse.passes import palettize, prune, quantize, upgrade
from milsparse.passes.registry import MILSPARSE_PASSES, PassSpec, register

register(
    PassSpec(
        name="milsparse::prune",
        summary="prune weight consts into constexpr_sparse_to_dense "
        "(threshold, magnitude, block, n:m)",
        # Pruning must see the final weights: after fusions fold batchnorm/bias/scale into them,
        # after the fp16 cast is folded, and after constants are deduplicated (tied weights).
        after=(
            "common::fuse_conv_batchnorm",
            "common::fuse_conv_bias",
            "common::fuse_conv_scale",
            "common::fuse_linear_bias",
            "common::fuse_matmul_weight_bias",
            "common::add_fp16_cast",
            "common::const_elimination",
            "common::const_deduplication",
            "common::cast_optimization",
        ),
        min_target=AvailableTarget.iOS16,
        transforms=(
            ("dense", "sparse", AvailableTarget.iOS16),
            ("palettized", "sparse+palettized", AvailableTarget.iOS18),
            ("quantized", "sparse+quantized", AvailableTarget.iOS18),
        ),
    )
)

# Palettize and quantize are not ordered against prune: both orders are valid (the joint form
# either way), so a pipeline keeps the order the recipe asks for.
_ANCHORS = MILSPARSE_PASSES["milsparse::prune"].after

register(
    PassSpec(
        name="milsparse::palettize",
        summary="palettize dense weight consts into constexpr_lut_to_dense (k-means or uniform "
        "tables, per tensor or per grouped channel)",
        after=_ANCHORS,
        min_target=AvailableTarget.iOS16,
        transforms=(
            ("dense", "palettized", AvailableTarget.iOS16),
            ("sparse", "sparse+palettized", AvailableTarget.iOS18),
        ),
    )
)

register(
    PassSpec(
        name="milsparse::quantize",
        summary="linearly quantize weight consts (int8/uint8/int4/uint4, per tensor, channel or "
        "block) into constexpr_blockwise_shift_scale or constexpr_affine_dequantize",
        after=_ANCHORS,
        min_target=AvailableTarget.iOS16,
        transforms=(
            ("dense", "quantized", AvailableTarget.iOS16),
            ("sparse", "sparse+quantized", AvailableTarget.iOS18),
        ),
    )
)

__all__ = ["palettize", "prune", "quantize", "upgrade", "register", "PassSpec"]
