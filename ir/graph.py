"""Read-only questions about a MIL program: who uses a value, through which operand.

Nothing here mutates a program.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Use", "uses_of", "walk_ops"]


@dataclass(frozen=True)
class Use:
    """`op` reads the value through its operand `input_name`."""

    op: object  # coremltools Operation
    input_name: str

    @property
    def op_type(self) -> str:
        return self.op.op_type


def uses_of(var) -> list[Use]:
    """Every (consumer op, operand name) reading `var`, in program order, each once."""
    uses = []
    seen = set()
    for op in var.child_ops:
        for name, value in op.inputs.items():
            values = value if isinstance(value, (list, tuple)) else (value,)
            if any(v is var for v in values) and (id(op), name) not in seen:
                seen.add((id(op), name))
                uses.append(Use(op, name))
    return uses


def walk_ops(block) -> Iterator[object]:
    """Every op of `block` and of its nested blocks, outer op before its inner ones."""
    for op in list(block.operations):
        yield op
        for inner in op.blocks:
            yield from walk_ops(inner)
