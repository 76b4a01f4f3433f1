"""MIL graph passes of milsparse, one per module; each registers itself (with coremltools and
with milsparse's registry) beside its class, from its declaration in `passes/catalog.py`.

Importing this package is light (the declarations need no coremltools); `load()` imports the
pass modules, and so registers them. The registry calls it on first use, and importing
coremltools does too (`milsparse.ct_import`).
"""

import importlib

__all__ = ["load", "PASS_MODULES"]

PASS_MODULES = ("palettize", "prune", "quantize", "upgrade")


def load() -> None:
    """Import (and so register) milsparse's passes; once, cheap after."""
    for name in PASS_MODULES:
        importlib.import_module(f"milsparse.passes.{name}")
