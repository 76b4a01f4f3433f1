"""Public home of milsparse's errors (defined in `milsparse.ir.errors`, the lowest layer)."""

from milsparse.ir.errors import (
    ConfigError,
    InternalError,
    MilsparseError,
    PassError,
    PipelineError,
    UnsupportedModelError,
    UnsupportedOpError,
    VerificationError,
)

__all__ = [
    "MilsparseError",
    "ConfigError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "PipelineError",
    "PassError",
    "InternalError",
    "VerificationError",
]
