"""The one place where milsparse passes mutate the ops of a MIL program (whole-program edits:
opset, function order, shared consts, live in `program_edits`).

Every rewrite has the same shape: build the replacement right before the old op, point every
use of the old value at the new one, delete the old op (and the consts that only it read), and
give the replacement the old name (so reports, the verifier and a second run see the same
weight names).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable

import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import Operation, Var
from milsparse.ir.blobs import release_pages

__all__ = ["replace_op", "named_const", "spilling", "deferring"]

# Where new values go while passes run on a saved model (None: they stay in memory).
_SPILL: contextvars.ContextVar = contextvars.ContextVar("milsparse_spill", default=None)


# Rewrites recorded instead of done (a worker thread's; see `deferring`).
_DEFERRED: contextvars.ContextVar = contextvars.ContextVar("milsparse_deferred", default=None)


@contextlib.contextmanager
def deferring():
    """Within the block, `replace_op` records `(op, build)` in the yielded
    list instead of rewriting: a pass computes a weight's replacement in a worker thread, and
    the main thread applies the recorded rewrites in program order (so the program, and the
    bytes written, do not depend on which thread finished first)."""
    recorded: list = []
    token = _DEFERRED.set(recorded)
    try:
        yield recorded
    finally:
        _DEFERRED.reset(token)


@contextlib.contextmanager
def spilling(spill):
    """Within the block, `named_const` puts every large value into `spill` (an
    `milsparse.ir.blobs.Spill`) and the const holds a read-only map of it; None changes nothing.
    """
    token = _SPILL.set(spill)
    try:
        yield
    finally:
        _SPILL.reset(token)


def named_const(val: np.ndarray, name: str, before_op: Operation) -> Var:
    """A `const` with a fixed name placed before `before_op` (names keep outputs deterministic).
    Inside `spilling(spill)`, a large value is written to the spill file and mapped."""
    spill = _SPILL.get()
    if spill is not None:
        val = spill.put(val)
    return mb.const(val=val, name=name, before_op=before_op)


def replace_op(op: Operation, build: Callable[[Operation, str], Var]) -> Var:
    """Replace the single-output op `op` (a const or a constexpr op) by whatever
    `build(op, tmp_name)` constructs before it.

    `build` receives the anchor op and a temporary name for its root op; it must create every op
    with `before_op=op`. The consts that only `op` read are removed with it. Returns the new
    var, renamed to the old op's name; None when recorded inside `deferring()`.
    """
    recorded = _DEFERRED.get()
    if recorded is not None:
        recorded.append((op, build))
        return None
    block = op.enclosing_block
    old_var = op.outputs[-1]
    name = op.name
    with block:
        new_var = build(op, f"{name}__milsparse_tmp")
    block.replace_uses_of_var_after_op(
        anchor_op=op, old_var=old_var, new_var=new_var, force_replace=True
    )
    dead_inputs = _consts_read_only_by(op)
    block.remove_ops([op])
    _release_value(op)
    for const in dead_inputs:
        const.enclosing_block.remove_ops([const])
        _release_value(const)
    new_var.op.name = name
    new_var.name = name
    _release_pages_below(new_var)
    return new_var


def _release_pages_below(var) -> None:
    """coremltools' type inference of a constexpr op reads its operands (a sparse op counts
    its mask's ones): the pages of mapped values read so leave this process's memory again."""
    seen, stack = set(), [var]
    while stack:
        op = stack.pop().op
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        if op.op_type == "const":
            release_pages(op.outputs[0].val)
        else:
            stack.extend(v for v in op.inputs.values() if isinstance(v, Var))


def _consts_read_only_by(op: Operation) -> list[Operation]:
    found = []
    for var in op.inputs.values():
        if not isinstance(var, Var) or var.op is None or var.op.op_type != "const":
            continue
        if all(child is op for child in var.child_ops) and var.op not in found:
            found.append(var.op)
    return found


def _release_value(op: Operation) -> None:
    """Drop a removed const's array now.

    A removed op and its output var reference each other, so its (possibly huge) value would
    live until the next full garbage collection; peak memory would then hold the dense and the
    compressed copy of every weight at once. Only the op's own values are dropped: the values
    of its inputs belong to ops that may stay.
    """
    if op.op_type != "const":
        return
    # A const keeps its value on its output var and on its `val` attribute (an internal var).
    for var in (*op.outputs, getattr(op, "val", None)):
        if hasattr(var, "_sym_val"):
            var._sym_val = None
