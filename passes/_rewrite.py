"""The one place where milsparse passes mutate the ops of a MIL program (whole-program edits:
opset, function order, shared consts, live in `program_edits`).

Every rewrite has the same shape: build the replacement right before the old op, point every
use of the old value at the new one, delete the old op (and the consts that only it read), and
give the replacement the old name (so reports, the verifier and a second run see the same
weight names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import Operation, Var
from milsparse.ir.blobs import release_pages

__all__ = ["Site", "Rewrites", "replace_op"]


@dataclass(frozen=True)
class Site:
    """Where a replacement is built: right before `op`. `spill` (an `milsparse.ir.blobs.Spill`,
    or None to keep values in memory) takes every large new value, and the const maps it."""

    op: Operation
    spill: object | None = None

    def const(self, val: np.ndarray, name: str) -> Var:
        """A `const` with a fixed name (names keep outputs deterministic) before `op`."""
        if self.spill is not None:
            val = self.spill.put(val)
        return mb.const(val=val, name=name, before_op=self.op)


class Rewrites:
    """The rewrites a pass asks for while it compresses one weight, recorded, not yet done.

    A pass's `compress` may run in a worker thread, where nothing may touch the program: it
    records `replace(op, build)`, and the walk, on the calling thread and in program order,
    `apply`s them (so the program, and the bytes written, do not depend on which thread
    finished first)."""

    def __init__(self) -> None:
        self._recorded: list[tuple[Operation, Callable[[Site, str], Var]]] = []

    def replace(self, op: Operation, build: Callable[[Site, str], Var]) -> None:
        """Record that `op` is to be replaced by what `build(site, tmp_name)` constructs."""
        self._recorded.append((op, build))

    def apply(self, spill=None) -> None:
        """Do the recorded rewrites, in the order recorded, new values into `spill`."""
        recorded, self._recorded = self._recorded, []
        for op, build in recorded:
            replace_op(op, build, spill)


def replace_op(op: Operation, build: Callable[[Site, str], Var], spill=None) -> Var:
    """Replace the single-output op `op` (a const or a constexpr op) by whatever
    `build(site, tmp_name)` constructs before it.

    `build` receives the `Site` (the anchor op, and `site.const` for new consts, their large
    values into `spill`) and a temporary name for its root op; it must create every op with
    `before_op=site.op`. The consts that only `op` read are removed with it. Returns the new
    var, renamed to the old op's name.
    """
    block = op.enclosing_block
    old_var = op.outputs[-1]
    name = op.name
    with block:
        new_var = build(Site(op, spill), f"{name}__milsparse_tmp")
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
