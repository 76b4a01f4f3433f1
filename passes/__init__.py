"""MIL graph passes of milsparse, one per module, each registered with coremltools and here."""

from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from milsparse.passes import prune, upgrade
from milsparse.passes.registry import PassSpec, register

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
    )
)

__all__ = ["prune", "upgrade", "register", "PassSpec"]
