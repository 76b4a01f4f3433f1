"""Errors raised by milsparse.

The hierarchy lives here, in the lowest layer, because `ir` may import neither `passes` nor the
`milsparse` package; `milsparse.errors` re-exports it as the public home. Every message says what
was wrong, where (a weight, op or file), and how to fix it.
"""

from __future__ import annotations

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


class MilsparseError(Exception):
    """Base class of every error milsparse raises on purpose."""


class ConfigError(MilsparseError, ValueError):
    """A recipe, pass option or CLI flag is malformed or out of range."""


class UnsupportedModelError(MilsparseError, ValueError):
    """The model is not something milsparse can work on (not an mlprogram, opset too old, ...).
    A ValueError, as coremltools' own refusals of a model are."""


class UnsupportedOpError(MilsparseError):
    """The program holds ops that a milsparse component has no implementation for."""


class PipelineError(MilsparseError, ValueError):
    """A pass pipeline cannot be built: unknown pass, dependency loop, conflict, target too low."""


class PassError(MilsparseError):
    """A pass failed while running; the message names it and the passes that ran before it."""


class InternalError(PassError):
    """A pass failed with an exception milsparse did not raise on purpose: a bug, not
    something the user can fix. The message names the pass and the passes that ran before it;
    the original exception is its `__cause__`. The CLI exits 3 for it (2 for the other
    MilsparseErrors)."""


class VerificationError(MilsparseError):
    """A compressed model failed verification against its reference."""
