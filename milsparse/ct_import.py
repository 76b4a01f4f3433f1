"""Importing coremltools quietly, when something first needs it, and registering milsparse's
passes with it then.

`import milsparse` does not import coremltools (which imports torch when it is installed, for
seconds): `milsparse --help`, argument errors and the CLI's parser stay fast. It puts a one-use
finder on `sys.meta_path` instead. When anyone imports coremltools (milsparse's own modules, or
the user's code), the finder runs coremltools' import with its import-time messages kept in
`IMPORT_NOTES` rather than printed, then registers milsparse's passes in coremltools'
PASS_REGISTRY (so `pipeline.append_pass("milsparse::prune")` works after `import milsparse`),
and takes itself off `sys.meta_path`.

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
        _register_passes()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "coremltools":
            return None
        _uninstall()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_FINDER = _Finder()


def _uninstall() -> None:
    with _LOCK:
        if _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)


def _register_passes() -> None:
    importlib.import_module("milsparse.passes")


def install() -> None:
    """Register milsparse's passes now if coremltools is imported already, else when it is."""
    if "coremltools" in sys.modules:
        _register_passes()
        return
    with _LOCK:
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
