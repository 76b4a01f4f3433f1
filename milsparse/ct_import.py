"""Importing coremltools quietly, when something first needs it, and registering milsparse's
passes with it then.

`import milsparse` does not import coremltools (which imports torch when it is installed, for
seconds): `milsparse --help`, argument errors and the CLI's parser stay fast. It puts a one-use
finder on `sys.meta_path` instead. When anyone imports coremltools (milsparse's own modules, or
the user's code), the finder runs coremltools' import with its import-time messages kept in
`IMPORT_NOTES` rather than printed, then registers milsparse's passes in coremltools'
PASS_REGISTRY (so `pipeline.append_pass("milsparse::prune")` works after `import milsparse`),
and takes itself off `sys.meta_path`.

When a milsparse module's own `import coremltools` brought it in, that module is part-way
through its import and the pass modules may need its names: the registration waits until the
last milsparse module being imported has finished (the finder wraps the loaders of milsparse's
modules until then, and the last one to finish registers).

What importing coremltools says is about the environment, not about milsparse's work: its
macOS-only prediction proxies do not load here, and the versions of torch, scikit-learn,
TensorFlow or XGBoost it finds are untested for conversions milsparse never makes. The CLI shows
the notes with --debug; errors still go through.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import threading
import warnings

__all__ = ["IMPORT_NOTES", "install"]

IMPORT_NOTES: list[str] = []
_LOCK = threading.Lock()


class _ImportNotes(logging.Filter):
    def filter(self, record):
        if record.levelno >= logging.ERROR:
            return True
        IMPORT_NOTES.append(record.getMessage())
        return False


class _QuietLoader(importlib.abc.Loader):
    """coremltools' own loader, run with its log records and warnings collected."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        logger = logging.getLogger("coremltools")
        notes = _ImportNotes()
        logger.addFilter(notes)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._inner.exec_module(module)
            IMPORT_NOTES.extend(str(w.message) for w in caught)
        finally:
            logger.removeFilter(notes)
        _state["coremltools"] = True
        _register_if_ready()


class _ThenRegister:
    """A milsparse module's own loader (everything else forwarded to it); once the module has
    run, registers the passes if coremltools is in and no milsparse module is still
    importing."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register_if_ready(finished=module.__name__)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "coremltools":
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            wrap = _QuietLoader
        elif name.split(".")[0] == "milsparse":
            spec = _others_spec(self, name, path, target)
            wrap = _ThenRegister
        else:
            return None
        if spec is not None and spec.loader is not None:
            spec.loader = wrap(spec.loader)
        return spec


def _others_spec(finder, name, path, target):
    """The spec the finders after this one give (milsparse may be an editable install)."""
    for other in list(sys.meta_path):
        if other is finder or not hasattr(other, "find_spec"):
            continue
        spec = other.find_spec(name, path, target)
        if spec is not None:
            return spec
    return None


_FINDER = _Finder()
_state = {"coremltools": False, "registered": False}


def _milsparse_importing(finished: str | None = None) -> bool:
    """Whether a milsparse module other than `finished` is part-way through its import."""
    return any(
        getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "milsparse" and name not in (finished, "milsparse")
    )


def _register_if_ready(finished: str | None = None) -> None:
    with _LOCK:
        ready = (
            _state["coremltools"]
            and not _state["registered"]
            and not _milsparse_importing(finished)
        )
        if ready:
            _state["registered"] = True
            if _FINDER in sys.meta_path:
                sys.meta_path.remove(_FINDER)
    if ready:
        importlib.import_module("milsparse.passes").load()


def install() -> None:
    """Register milsparse's passes now if coremltools is imported already, else when it is."""
    with _LOCK:
        if "coremltools" in sys.modules:
            _state["coremltools"] = True
        if not _state["registered"] and _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    _register_if_ready()
