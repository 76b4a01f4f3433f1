"""milsparse: prune Core ML (MIL) weights into sparse constexpr ops.

import coremltools as ct, milsparse as ms
small = ms.compress("model.mlpackage", "2:4")          # n:m, magnitude, block or threshold
ms.save(small, "model.sparse.mlpackage")
mlmodel = ct.convert(traced, pass_pipeline=ms.coreml_pipeline("unstructured:0.5"),
                     minimum_deployment_target=ct.target.iOS18)
"""

import logging as _logging


class _ImportNoise(_logging.Filter):
    """coremltools warns on import that it cannot load its macOS-only prediction proxies and that
    the torch version is untested; both are expected here (milsparse never predicts with Core ML)
    and are hidden while milsparse imports it. Nothing else is filtered, and only during import."""

    def filter(self, record):
        msg = record.getMessage()
        return not (
            msg.startswith("Failed to load _") or "has not been tested with coremltools" in msg
        )


_filter = _ImportNoise()
_logging.getLogger("coremltools").addFilter(_filter)
try:
    import coremltools as _ct  # noqa: F401
finally:
    _logging.getLogger("coremltools").removeFilter(_filter)

from milsparse import passes as _passes  # noqa: E402,F401  (registers milsparse:: passes)
from milsparse.api import (  # noqa: E402
    compress,
    compress_with_report,
    coreml_pipeline,
    inspect_model,
    load_program,
    run_passes,
    save,
)
from milsparse.errors import (
    ConfigError,
    MilsparseError,
    PassError,
    PipelineError,
    UnsupportedModelError,
    UnsupportedOpError,
    VerificationError,
)
from milsparse.passes.config import PruneConfig, PruneSpec, parse_prune_config, parse_prune_spec
from milsparse.recipe import Recipe
from milsparse.report import CompressReport, InspectReport
from milsparse.verify import Tolerances, VerifyReport, evaluate, verify

__version__ = "0.1.0"

__all__ = [
    "compress",
    "compress_with_report",
    "coreml_pipeline",
    "inspect_model",
    "load_program",
    "run_passes",
    "save",
    "evaluate",
    "verify",
    "Tolerances",
    "VerifyReport",
    "Recipe",
    "PruneConfig",
    "PruneSpec",
    "parse_prune_config",
    "parse_prune_spec",
    "CompressReport",
    "InspectReport",
    "MilsparseError",
    "ConfigError",
    "UnsupportedModelError",
    "UnsupportedOpError",
    "PipelineError",
    "PassError",
    "VerificationError",
]
