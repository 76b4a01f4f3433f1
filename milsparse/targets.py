"""Deployment targets: the names milsparse accepts, and the opset each one means."""

from __future__ import annotations

from coremltools.converters.mil._deployment_compatibility import AvailableTarget

from milsparse.errors import ConfigError

__all__ = ["TARGETS", "parse_target"]

# The deployment targets milsparse writes: constexpr_sparse_to_dense needs iOS16; the iOS18
# opset adds the uint1 mask and the joint forms. The same opsets under their other platforms'
# names (macOS13-15, tvOS16-18, watchOS9-11) are accepted too.
TARGETS = {
    "ios16": AvailableTarget.iOS16,
    "ios17": AvailableTarget.iOS17,
    "ios18": AvailableTarget.iOS18,
}
_TARGET_ALIASES = {
    name.lower(): member
    for name, member in AvailableTarget.__members__.items()
    if member in TARGETS.values()
}


def parse_target(target) -> AvailableTarget | None:
    """None, a ct.target from iOS16 to iOS18, or a name: 'ios16' | 'ios17' | 'ios18', or the
    same opsets as 'macOS13'-'macOS15', 'tvOS16'-'tvOS18', 'watchOS9'-'watchOS11' (any case)."""
    if target is None:
        return None
    if isinstance(target, AvailableTarget) and target in TARGETS.values():
        return target
    if isinstance(target, str) and target.strip().lower() in _TARGET_ALIASES:
        return _TARGET_ALIASES[target.strip().lower()]
    shown = target.name if isinstance(target, AvailableTarget) else repr(target)
    raise ConfigError(
        f"unsupported target {shown}; use one of {', '.join(TARGETS)} "
        "(or macOS13-15, tvOS16-18, watchOS9-11)"
    )
