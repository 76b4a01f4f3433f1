"""The interpreter's `Cursor`: several samples stepped through one function together.

Calibration and verification run many samples through one program; a shared decode cache
would hold every weight at once. A cursor runs the samples a stretch of ops at a time, each
weight decoded once per stretch for all samples and dropped after it, and can stop before a
weight's consumer, show its inputs to observers, and go on after the program changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from milsparse.ir.blobs import release_pages
from milsparse.ir.fp16 import external_value
from milsparse.ir.interpreter import (
    ChainedEnv,
    PlannedOp,
    StopRun,
    check_supported,
    execute,
    input_env,
    is_static,
    last_uses,
    load_kernels,
    ops_within,
)

__all__ = ["CURSOR_STRETCH_BYTES", "Cursor", "run_samples", "top_level_op"]


# Decoded weight bytes a `Cursor` keeps while its samples pass one stretch of ops.
CURSOR_STRETCH_BYTES = 16 << 20


def top_level_op(op, func):
    """The op of `func`'s own block that is, or holds (in nested blocks), `op`."""
    while op.enclosing_block is not func:
        outer = op.enclosing_block.outer_op
        if outer is None:
            raise ValueError(f"op {op.name!r} is not in this function")
        op = outer
    return op


def _static_bytes(op) -> int:
    """The decoded size of a const or constexpr op's outputs (float32 for fp16), 0 for others."""
    if not is_static(op):
        return 0
    total = 0
    for var in op.outputs:
        shape = getattr(var, "shape", ())
        if all(isinstance(d, int) for d in shape):
            total += int(np.prod(shape, dtype=np.int64)) * 4
    return total


class Cursor:
    """Several samples stepped through one function together, a stretch of ops at a time.

    Each sample keeps its own values, only those the ops still to run will read. Every sample
    passes a stretch before the next stretch starts, so a weight decoded in a stretch serves
    all samples and is dropped after it: memory holds the samples' live activations and one
    stretch's decoded weights (about `stretch_bytes`), never every weight of the program, as a
    shared `evaluate_program` cache does.

    The program may change between calls, as when a pass replaces a weight whose consumer the
    cursor has not reached: each call re-reads the function's ops and runs those it has not run
    (the replacement's ops included). So sequential calibration costs one run of the samples
    in all: `advance(until=consumer)` runs the program as pruned so far up to a weight's
    consumer, `probe` shows the consumer's inputs to the observers, the pass prunes the weight,
    and the next `advance` goes on from there.
    """

    def __init__(
        self,
        prog,
        samples: list[Mapping[str, Any]],
        function: str = "main",
        stretch_bytes: int = CURSOR_STRETCH_BYTES,
    ):
        self.prog, self.function = prog, function
        self.stretch_bytes = stretch_bytes
        func = prog.functions[function]
        load_kernels()
        check_supported(prog, function)
        self._envs = [
            input_env(func, sample, f"input sample {i}" if len(samples) > 1 else "inputs")
            for i, sample in enumerate(samples)
        ]
        # id -> op already run for every sample; holding the ops keeps their ids unique
        self._done: dict[int, Any] = {}
        # the index of the sample running now (None between runs), for observers' messages
        self.current_sample: int | None = None

    def __len__(self) -> int:
        return len(self._envs)

    def _func(self):
        return self.prog.functions[self.function]

    def _pending(self) -> list[PlannedOp]:
        func = self._func()
        freed = last_uses(func)
        return [
            PlannedOp(op, freed.get(i, ()))
            for i, op in enumerate(func.operations)
            if id(op) not in self._done
        ]

    def reached(self, op) -> bool:
        """Whether the top-level op holding `op` has run (a probe of it would come too late)."""
        return id(top_level_op(op, self._func())) in self._done

    def _index(self, steps: list[PlannedOp], op) -> int:
        top = top_level_op(op, self._func())
        for i, step in enumerate(steps):
            if step.op is top:
                return i
        raise ValueError(f"op {op.name!r} has already run")

    def _drop_dead(self, steps: list[PlannedOp]) -> None:
        """Forget values no op still to run reads (those of ops a pass removed, for one)."""
        live = {id(var) for var in self._func().outputs}
        for step in steps:
            for reader in ops_within(step.op):
                for value in reader.inputs.values():
                    for var in value if isinstance(value, (list, tuple)) else (value,):
                        live.add(id(var))
        for env in self._envs:
            for key in [k for k in env if k not in live]:
                del env[key]

    def _stretches(self, steps: list[PlannedOp]) -> list[list[PlannedOp]]:
        out, current, size = [], [], 0
        for step in steps:
            cost = _static_bytes(step.op)
            if current and size + cost > self.stretch_bytes:
                out.append(current)
                current, size = [], 0
            current.append(step)
            size += cost
        if current:
            out.append(current)
        return out

    def advance(self, until=None, observers: Mapping | None = None, progress=None) -> None:
        """Run, for every sample, the ops not run yet, up to (not including) the top-level op
        holding `until`, or to the end. `observers` as in `run_block` (they may not stop the
        run). `progress(done, total)` is called after each sample's pass over a stretch."""
        pending = self._pending()
        self._drop_dead(pending)
        steps = pending if until is None else pending[: self._index(pending, until)]
        stretches = self._stretches(steps)
        total, done = len(stretches) * len(self._envs), 0
        for stretch in stretches:
            cache: dict = {}
            for i, env in enumerate(self._envs):
                self.current_sample = i
                try:
                    execute(stretch, env, cache, observers)
                finally:
                    self.current_sample = None
                done += 1
                if progress is not None:
                    progress(done, total)
            for step in stretch:
                self._done[id(step.op)] = step.op
                if step.op.op_type == "const":  # mapped from a file: the pages leave memory
                    release_pages(step.op.outputs[0].val)
            del cache

    def probe(self, ops, observers: Mapping, progress=None) -> None:
        """Show `observers` the inputs of `ops` (not run yet): each sample runs from here
        through the top-level op holding the last of them, on a scratch copy of its values;
        nothing is kept, and the cursor stays where it is. An observer may raise `StopRun` to
        end a sample's probe."""
        steps = self._pending()
        last = max(self._index(steps, op) for op in ops)
        steps = steps[: last + 1]
        cache: dict = {}
        for i, env in enumerate(self._envs):
            scratch = ChainedEnv(env)
            self.current_sample = i
            try:
                execute(steps, scratch, cache, observers)
            except StopRun:
                pass
            finally:
                self.current_sample = None
            del scratch
            if progress is not None:
                progress(i + 1, len(self._envs))

    def outputs(self) -> list[dict[str, np.ndarray]]:
        """Each sample's outputs, once `advance()` has run the function to its end."""
        func = self._func()
        if any(id(op) not in self._done for op in func.operations):
            raise RuntimeError("the cursor has not reached the end of the function")
        return [
            {var.name: external_value(env[id(var)], var) for var in func.outputs}
            for env in self._envs
        ]


def run_samples(prog, samples: list[Mapping[str, Any]], function: str = "main") -> list[dict]:
    """Each sample's outputs of `function`, the samples run together (a `Cursor`: each weight
    decoded once for all of them, a stretch at a time)."""
    cursor = Cursor(prog, samples, function)
    cursor.advance()
    return cursor.outputs()
