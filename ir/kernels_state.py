"""Kernels of iOS18 stateful models: `read_state` and `coreml_update_state` on the run's
`StateCell`s (state inputs start at zeros unless the inputs give them)."""

from __future__ import annotations

import numpy as np
from milsparse.ir.interpreter import StateCell, kernel


def _cell(value) -> StateCell:
    if not isinstance(value, StateCell):
        raise TypeError("the operand is not a state input of the function")
    return value


@kernel("read_state")
def read_state(op, v, ctx):
    return _cell(v["input"]).value


@kernel("coreml_update_state")
def coreml_update_state(op, v, ctx):
    cell = _cell(v["state"])
    value = np.asarray(v["value"])
    if value.shape != cell.value.shape:
        raise ValueError(f"state update of shape {value.shape} for a state of {cell.value.shape}")
    cell.value = value
    return value
