"""What one run gives its passes, and where the passes leave their reports.

`RunContext` is handed to a pass when it is built (`PruneWeights(config, context=...)`):
calibration samples, the number of worker threads, the spill file new values go to, the
report sink. Nothing reaches into a pass from outside after that.

Inside `ct.convert`, coremltools builds each registered pass itself, with no arguments, and
sets its pipeline options as attributes (`config`, `jobs`, `run`). A pass given a `run` key
(milsparse's `coreml_pipeline` sets one) finds its `ReportSink` by that key: the sink lives as
long as the pipeline that carries it (a weak map, no module-level list of past runs).
"""

from __future__ import annotations

import threading
import uuid
import weakref
from dataclasses import dataclass, field

__all__ = ["RunContext", "ReportSink", "sink_for"]

_SINKS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


class ReportSink:
    """The reports of the passes of one run: pass name -> (decisions, unused override
    patterns), as each pass finishes; a later run of the same pass replaces its entry."""

    def __init__(self):
        self.key = uuid.uuid4().hex
        self.reports: dict[str, tuple[list, list[str]]] = {}
        with _LOCK:
            _SINKS[self.key] = self

    def put(self, pass_name: str, decisions: list, unused_overrides: list[str]) -> None:
        self.reports[pass_name] = (list(decisions), list(unused_overrides))


def sink_for(key) -> ReportSink | None:
    """The live sink of `key` (a pipeline's `run` option), or None."""
    with _LOCK:
        return _SINKS.get(str(key)) if key is not None else None


@dataclass(frozen=True)
class RunContext:
    """A run's inputs to its passes.

    `calibration`: checked calibration samples (input name -> array), for prune's data-aware
    criteria and allocation, and for palettize and quantize to weight their fits by each input
    column's activation energy. `jobs`: weights compressed at once in worker threads. `spill`:
    an `ir.blobs.Spill` the new values are written to (the program maps them), or None to keep
    them in memory. `sink`: where the passes leave their reports. `progress`: whether the passes
    show progress bars (None: only on a terminal; see `milsparse.ir.progress`)."""

    calibration: list[dict] | None = None
    jobs: int = 1
    spill: object | None = None
    sink: ReportSink | None = field(default=None, compare=False)
    progress: bool | None = field(default=None, compare=False)
