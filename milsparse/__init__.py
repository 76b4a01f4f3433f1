"""milsparse: prune Core ML (MIL) weights into sparse constexpr ops.

import coremltools as ct, milsparse as ms
small = ms.compress("model.mlpackage", "2:4")          # n:m, magnitude, block or threshold
ms.save(small, "model.sparse.mlpackage")
mlmodel = ct.convert(traced, pass_pipeline=ms.coreml_pipeline("unstructured:0.5"),
                     minimum_deployment_target=ct.target.iOS18)
"""

from milsparse import ct_import as _ct_import

IMPORT_NOTES = _ct_import.IMPORT_NOTES
_ct_import.install()

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
from milsparse.errors import (  # noqa: E402
    ConfigError,
    InternalError,
    MilsparseError,
    PassError,
    PipelineError,
    UnsupportedModelError,
    UnsupportedOpError,
    VerificationError,
)
from milsparse.passes.config import (  # noqa: E402
    PruneConfig,
    PruneSpec,
    parse_prune_config,
    parse_prune_spec,
)
from milsparse.passes.lut_config import PalettizeConfig, PalettizeSpec  # noqa: E402
from milsparse.passes.quant_config import QuantizeConfig, QuantizeSpec  # noqa: E402
from milsparse.recipe import Recipe, Step  # noqa: E402
from milsparse.report import CompressReport, InspectReport  # noqa: E402
from milsparse.verify import Tolerances, VerifyReport, evaluate, verify  # noqa: E402

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
