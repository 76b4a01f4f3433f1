"""A pytest plugin that runs coremltools' own weight-compression tests against milsparse.

    python -m pytest -p ct_dropin <site-packages>/coremltools/test/optimize/coreml/\
test_post_training_quantization.py      (with this folder on PYTHONPATH)

At configure time, before coremltools' test module is imported, it puts milsparse's drop-in
functions in place of coremltools' (`coremltools.optimize.coreml.<name>`, which the tests call
through `cto.coreml.<name>` and `ct.optimize.coreml.<name>`). A function milsparse lacks is
replaced by one that raises, so its tests fail rather than pass on coremltools' code.
`--ct-baseline` swaps nothing: the same run on coremltools itself.

coremltools' test module imports torchvision (for tests outside the classes run here); when it
is not installed, an empty stand-in module takes its place.
"""

from __future__ import annotations

import importlib.util
import sys
import types

FUNCTIONS = (
    "prune_weights",
    "palettize_weights",
    "linear_quantize_weights",
    "decompress_weights",
    "get_weights_metadata",
)


def pytest_addoption(parser):
    parser.addoption("--ct-baseline", action="store_true", help="run on coremltools' own functions")


def _missing(name):
    def missing(*args, **kwargs):
        raise NotImplementedError(f"milsparse.coreml has no {name}")

    missing.__name__ = name
    return missing


def pytest_configure(config):
    if importlib.util.find_spec("torchvision") is None:
        sys.modules["torchvision"] = types.ModuleType("torchvision")
    if config.getoption("--ct-baseline"):
        return
    import coremltools.optimize.coreml as ct_coreml

    import milsparse.coreml as ms_coreml

    for name in FUNCTIONS:
        setattr(ct_coreml, name, getattr(ms_coreml, name, None) or _missing(name))
