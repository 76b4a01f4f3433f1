"""Deployment targets: the names milsparse accepts, and the opset each one means."""

from __future__ import annotations

from coremltools.converters.mil._deployment_compatibility import AvailableTarget

from milsparse.errors import ConfigError

__all__ = ["TARGETS", "parse_target"]

# The deployment targets milsparse writes: every one coremltools offers from iOS16 on
# (constexpr_sparse_to_dense needs iOS16; the iOS18 opset adds the uint1 mask and the joint
# forms; iOS26, specification 10, keeps iOS18's constexpr ops). The same opsets under their
# other platforms' names (macOS13-15 and 26, tvOS16-18 and 26, watchOS9-11 and 26) are
# accepted too.
TARGETS = {
    name.lower(): member
    for name, member in AvailableTarget.__members__.items()
    if name.startswith("iOS") and member >= AvailableTarget.iOS16
}
_TARGET_ALIASES = {
    name.lower(): member
    for name, member in AvailableTarget.__members__.items()
    if member in TARGETS.values()
}


def parse_target(target) -> AvailableTarget | None:
    """None, a ct.target from iOS16 on, or a name: 'ios16' | 'ios17' | 'ios18' | 'ios26', or the
    same opsets under their macOS, tvOS and watchOS names (any case)."""
    if target is None:
        return None
    if isinstance(target, AvailableTarget) and target in TARGETS.values():
        return target
    if isinstance(target, str) and target.strip().lower() in _TARGET_ALIASES:
        return _TARGET_ALIASES[target.strip().lower()]
    shown = target.name if isinstance(target, AvailableTarget) else repr(target)
    raise ConfigError(
        f"unsupported target {shown}; use one of {', '.join(TARGETS)} "
        "(or the same under their macOS, tvOS and watchOS names)"
    )
