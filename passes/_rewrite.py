"""The one place where milsparse passes mutate a MIL program.

Every rewrite has the same shape: build the replacement right before the old `const`, point
every use of the old value at the new one, delete the old op, and give the replacement the old
name (so reports, the verifier and a second run see the same weight names).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import Operation, Var

__all__ = ["replace_const", "named_const"]


def named_const(val: np.ndarray, name: str, before_op: Operation) -> Var:
    """A `const` with a fixed name placed before `before_op` (names keep outputs deterministic)."""
    return mb.const(val=val, name=name, before_op=before_op)


def replace_const(op: Operation, build: Callable[[Operation, str], Var]) -> Var:
    """Replace `const` op `op` by whatever `build(op, tmp_name)` constructs before it.

    `build` receives the anchor op and a temporary name for its root op; it must create every op
    with `before_op=op`. Returns the new var, renamed to the old const's name.
    """
    block = op.enclosing_block
    old_var = op.outputs[0]
    name = op.name
    with block:
        new_var = build(op, f"{name}__milsparse_tmp")
    block.replace_uses_of_var_after_op(
        anchor_op=op, old_var=old_var, new_var=new_var, force_replace=True
    )
    block.remove_ops([op])
    _release_value(op)
    new_var.op.name = name
    new_var.name = name
    return new_var


def _release_value(op: Operation) -> None:
    """Drop the removed const's array now.

    A removed op and its output var reference each other, so its (possibly huge) value would
    live until the next full garbage collection; peak memory would then hold the dense and the
    compressed copy of every weight at once.
    """
    # A const keeps its value on its output var and on its `val` attribute (an internal var).
    for var in (*op.outputs, *op.inputs.values(), getattr(op, "val", None)):
        if hasattr(var, "_sym_val"):
            var._sym_val = None
