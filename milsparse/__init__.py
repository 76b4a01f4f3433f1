"""milsparse: prune Core ML (MIL) weights into sparse constexpr ops.

import coremltools as ct, milsparse as ms
small = ms.compress("model.mlpackage", "2:4")          # n:m, magnitude, block or threshold
ms.save(small, "model.sparse.mlpackage")
mlmodel = ct.convert(traced, pass_pipeline=ms.coreml_pipeline("unstructured:0.5"),
                     minimum_deployment_target=ct.target.iOS18)
"""

import logging as _logging
import warnings as _warnings


class _ImportNotes(_logging.Filter):
    """What importing coremltools says is about the environment, not about milsparse's work:
    its macOS-only prediction proxies do not load here, and the versions of torch, scikit-learn,
    TensorFlow or XGBoost it finds are untested or unsupported for conversions milsparse never
    makes. Those messages are kept in `IMPORT_NOTES` (the CLI shows them with --debug) instead
    of printed; only during the import, and errors still go through."""

    def filter(self, record):
        if record.levelno >= _logging.ERROR:
            return True
        IMPORT_NOTES.append(record.getMessage())
        return False


IMPORT_NOTES: list[str] = []
_filter = _ImportNotes()
_logging.getLogger("coremltools").addFilter(_filter)
try:
    with _warnings.catch_warnings(record=True) as _caught:
        _warnings.simplefilter("always")
        import coremltools as _ct  # noqa: F401
    IMPORT_NOTES.extend(str(w.message) for w in _caught)
finally:
    _logging.getLogger("coremltools").removeFilter(_filter)

from milsparse import passes as _passes  # noqa: E402,F401  (registers milsparse:: passes)
from milsparse.api import (  # noqa: E402
    check_recipe,
    compress,
    compress_with_report,
    conversion_report,
    convert,
    convert_with_report,
    coreml_pipeline,
    inspect_model,
    load_program,
    run_passes,
    save,
)
from milsparse.errors import (
    ConfigError,
    InternalError,
    MilsparseError,
    PassError,
    PipelineError,
    UnsupportedModelError,
    UnsupportedOpError,
    VerificationError,
)
from milsparse.passes.config import PruneConfig, PruneSpec, parse_prune_config, parse_prune_spec
from milsparse.passes.lut_config import PalettizeConfig, PalettizeSpec
from milsparse.passes.quant_config import QuantizeConfig, QuantizeSpec
from milsparse.recipe import Recipe, Step
from milsparse.report import CompressReport, InspectReport
from milsparse.verify import Tolerances, VerifyReport, evaluate, verify

__version__ = "0.1.0"

__all__ = [
    "IMPORT_NOTES",
    "compress",
    "compress_with_report",
    "check_recipe",
    "convert",
    "convert_with_report",
    "conversion_report",
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
    "Step",
    "PalettizeConfig",
    "PalettizeSpec",
    "QuantizeConfig",
    "QuantizeSpec",
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
    "InternalError",
    "VerificationError",
]
