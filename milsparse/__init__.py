"""milsparse: prune Core ML (MIL) weights into sparse constexpr ops.

import coremltools as ct, milsparse as ms
small = ms.compress("model.mlpackage", "2:4")          # n:m, magnitude, block or threshold
ms.save(small, "model.sparse.mlpackage")
mlmodel = ct.convert(traced, pass_pipeline=ms.coreml_pipeline("unstructured:0.5"),
                     inputs=[ct.TensorType(shape=(1, 3, 224, 224))],
                     minimum_deployment_target=ct.target.iOS18)

`import milsparse` is quick: it imports neither coremltools nor torch. Each public name loads
its module on first use, and milsparse's passes are registered with coremltools when
coremltools is imported, by anyone (`ct_import`).
"""

from __future__ import annotations

import importlib

from milsparse import ct_import as _ct_import

IMPORT_NOTES = _ct_import.IMPORT_NOTES
_ct_import.install()

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    **dict.fromkeys(
        (
            "check_recipe",
            "compress",
            "compress_with_report",
            "conversion_report",
            "convert",
            "convert_with_report",
            "coreml_pipeline",
            "inspect_model",
            "load_program",
            "run_passes",
            "save",
        ),
        "milsparse.api",
    ),
    **dict.fromkeys(
        (
            "ConfigError",
            "InternalError",
            "MilsparseError",
            "PassError",
            "PipelineError",
            "UnsupportedModelError",
            "UnsupportedOpError",
            "VerificationError",
        ),
        "milsparse.errors",
    ),
    **dict.fromkeys(
        ("PruneConfig", "PruneSpec", "parse_prune_config", "parse_prune_spec"),
        "milsparse.passes.prune_config",
    ),
    "PalettizeConfig": "milsparse.passes.lut_config",
    "PalettizeSpec": "milsparse.passes.lut_config",
    "QuantizeConfig": "milsparse.passes.quant_config",
    "QuantizeSpec": "milsparse.passes.quant_config",
    "Recipe": "milsparse.recipe",
    "Step": "milsparse.recipe",
    "CompressReport": "milsparse.report",
    "InspectReport": "milsparse.report",
    "Tolerances": "milsparse.metrics",
    "VerifyReport": "milsparse.verification",
    "evaluate": "milsparse.verification",
    "verify": "milsparse.verification",
}

__all__ = ["IMPORT_NOTES", *_HOMES]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'milsparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # found once; later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
