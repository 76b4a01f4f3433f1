"""A numpy reference interpreter for MIL programs.

The shape of JAX's `eval_jaxpr`: a dict of values, `read`/`write`, one loop over the ops of a
block in order, multi-output ops, values freed after their last use. Kernels are pure numpy
functions in a table `op_type -> function`, filled by `@kernel("conv")` in the `kernels_*`
modules; a program with ops that have no kernel is refused, naming all of them, before anything
runs.

Precision: every floating tensor is computed in float32 and rounded to the dtype of the op's
output var when the kernel returns, so fp16 programs are rounded to fp16 at op boundaries, as
Core ML's fp16 compute does at layer granularity (inside an op Core ML may keep more or less
precision than this). fp16 values are held as float32 arrays of fp16-representable numbers, so
kernels never pay for widening; the program's fp16 outputs are returned as float16. Constant
weights decoded into a `cache` are held that way too (float32: twice their fp16 size). The
rounding rules are in `fp16`; running many samples together, a stretch at a time, in `cursor`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from coremltools.converters.mil.mil import types
from milsparse.ir.errors import UnsupportedOpError
from milsparse.ir.fp16 import VALUE_PRESERVING, conform, conform_to, external_value, output_rule
from milsparse.ir.samples import check_sample, is_state

__all__ = [
    "KERNELS",
    "kernel",
    "unsupported_ops",
    "evaluate_program",
    "run_block",
    "static_values",
    "StopRun",
    "StateCell",
]

Kernel = Callable[..., Any]
KERNELS: dict[str, Kernel] = {}


def kernel(*op_types: str):
    """Register a kernel `fn(op, v, ctx)` for `op_types`; `v` maps input names to values."""

    def register(fn: Kernel) -> Kernel:
        for name in op_types:
            KERNELS[name] = fn
        return fn

    return register


def _all_ops(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _all_ops(inner)


def unsupported_ops(prog, function: str = "main") -> list[str]:
    """Sorted op types of `function` (nested blocks included) without a kernel."""
    load_kernels()
    return sorted(
        {op.op_type for op in _all_ops(prog.functions[function]) if op.op_type not in KERNELS}
    )


class Context:
    """What control-flow kernels need: running nested blocks with the enclosing values (and
    the run's observers)."""

    def __init__(self, env: dict, cache: dict | None, observers: Mapping | None = None):
        self.env = env
        self.cache = cache
        self.observers = observers

    def run(self, block, inputs: list) -> list:
        return run_block(block, self.env, inputs, self.cache, self.observers)


def is_static(op) -> bool:
    """consts and constexpr ops: their values never depend on the program's inputs."""
    return op.op_type == "const" or op.op_type.startswith("constexpr_")


def last_uses(block) -> dict[int, list]:
    """op index -> vars whose last reader (in this block or its nested blocks) is that op."""
    last: dict[int, int] = {}
    var_of: dict[int, Any] = {}
    for i, op in enumerate(block.operations):
        for inner_op in ops_within(op):
            for value in inner_op.inputs.values():
                for var in value if isinstance(value, (list, tuple)) else (value,):
                    last[id(var)] = i
                    var_of[id(var)] = var
    keep = {id(v) for v in block.outputs}
    freed: dict[int, list] = {}
    for key, i in last.items():
        if key not in keep:
            freed.setdefault(i, []).append(var_of[key])
    return freed


def ops_within(op):
    yield op
    for inner in op.blocks:
        yield from _all_ops(inner)
        # a nested block's outputs may be outer vars read by nothing else
        for var in inner.outputs:
            yield _Reader(var)


class _Reader:
    """Stands for a nested block reading `var` as one of its outputs."""

    def __init__(self, var):
        self.inputs = {"out": var}


class PlannedOp:
    """One op, prepared once: its kernel, where its inputs and outputs live, what to free."""

    __slots__ = ("op", "fn", "inputs", "outputs", "rules", "static", "free")

    def __init__(self, op, freed):
        self.op = op
        self.fn = KERNELS[op.op_type]
        self.inputs = [
            (name, tuple(var) if isinstance(var, (list, tuple)) else var)
            for name, var in op.inputs.items()
        ]
        self.outputs = [id(var) for var in op.outputs]
        preserves = op.op_type in VALUE_PRESERVING
        self.rules = [output_rule(var, preserves) for var in op.outputs]
        self.static = is_static(op)
        self.free = [id(var) for var in freed]


def _plan(block, cache: dict | None) -> list[PlannedOp]:
    key = ("plan", id(block))
    if cache is not None and key in cache:
        return cache[key]
    freed = last_uses(block)
    steps = [PlannedOp(op, freed.get(i, ())) for i, op in enumerate(block.operations)]
    if cache is not None:
        cache[key] = steps
    return steps


def run_block(
    block,
    outer_env: dict,
    inputs: list | None = None,
    cache: dict | None = None,
    observers: Mapping | None = None,
) -> list:
    """Run `block`'s ops; its inputs take `inputs`; returns the values of `block.outputs`.

    `cache`, when given, keeps the (decoded) values of const and constexpr ops across runs, and
    the prepared op list. Values are held in the interpreter's form (fp16 as float32 arrays).

    `observers` maps `id(op)` to a callable `observer(op, inputs)`, called with the op's input
    values (name -> array, as its kernel receives them) right before the op runs, in nested
    blocks too. This is how calibration sees each weight's input activations while samples
    stream through; an observer may raise `StopRun` to end the run early.
    """
    env = ChainedEnv(outer_env)
    for var, value in zip(block.inputs, inputs or [], strict=False):
        env[id(var)] = value
    execute(_plan(block, cache), env, cache, observers)
    return [_read(env, v) for v in block.outputs]


def execute(steps, env, cache: dict | None, observers: Mapping | None) -> None:
    """Run prepared `steps` in `env` (see `run_block`).

    numpy's floating-point warnings are off while the ops run: a kernel's inf or nan (an fp16
    cast that overflows, inf * 0 in a matmul) is the program's IEEE result, as on device, and
    the callers judge it (verify refuses a non-finite reference and fails a non-finite
    candidate, calibration refuses non-finite statistics), in one message of their own."""
    with np.errstate(all="ignore"):
        _execute_steps(steps, env, cache, observers)


def _execute_steps(steps, env, cache: dict | None, observers: Mapping | None) -> None:
    ctx = Context(env, cache, observers)
    for step in steps:
        if step.static and cache is not None:
            hit = cache.get(id(step.op))
            if hit is not None:
                for key, value in zip(step.outputs, hit, strict=True):
                    env[key] = value
                continue
        values = {}
        for name, var in step.inputs:
            if isinstance(var, tuple):
                values[name] = [_read(env, v) for v in var]
            else:
                values[name] = _read(env, var)
        if observers:
            observe = observers.get(id(step.op))
            if observe is not None:
                observe(step.op, values)
        try:
            result = step.fn(step.op, values, ctx)
        except (ValueError, TypeError, IndexError) as e:
            raise RuntimeError(
                f"kernel {step.op.op_type} failed on op {step.op.name!r}: {e}"
            ) from e
        results = result if len(step.outputs) > 1 else (result,)
        for key, value, rule in zip(step.outputs, results, step.rules, strict=True):
            env[key] = conform_to(value, *rule)
        if step.static and cache is not None:
            cache[id(step.op)] = [env[key] for key in step.outputs]
        for key in step.free:
            env.pop_local(key)


def _read(env, var):
    try:
        return env[id(var)]
    except KeyError:
        if var.val is not None:  # a constant without a producing op in this scope
            value = np.asarray(var.val)
            return value.astype(np.float32) if value.dtype == np.float16 else value
        raise RuntimeError(f"value {var.name!r} is read before it is computed") from None


class ChainedEnv(dict):
    """A block's values, falling back to the enclosing block's (for nested blocks)."""

    def __init__(self, parent: Mapping | None):
        super().__init__()
        self.parent = parent

    def __missing__(self, key):
        if self.parent is None:
            raise KeyError(key)
        return self.parent[key]

    def pop_local(self, key):
        dict.pop(self, key, None)


_KERNEL_MODULES_LOADED = False


def load_kernels() -> None:
    global _KERNEL_MODULES_LOADED
    if not _KERNEL_MODULES_LOADED:
        from milsparse.ir import (  # noqa: F401  (import registers the kernels)
            kernels_constexpr,
            kernels_control,
            kernels_math,
            kernels_nn,
            kernels_state,
            kernels_tensor,
        )

        _KERNEL_MODULES_LOADED = True


def check_supported(prog, function: str) -> None:
    missing = unsupported_ops(prog, function)
    if missing:
        raise UnsupportedOpError(
            f"the reference interpreter has no kernel for: {', '.join(missing)}"
        )


class StateCell:
    """The value of a `state` input (an iOS18 stateful model's KV cache, say): `read_state`
    reads it, `coreml_update_state` replaces it; it lasts one run of the function."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def input_env(func, inputs: Mapping[str, Any], where: str = "inputs") -> ChainedEnv:
    """A top-level env holding the function's inputs (checked by `samples.check_sample`, in the
    interpreter's form). A state input starts from its entry in `inputs` when there is one,
    else from zeros."""
    env = ChainedEnv(None)
    given = check_sample(func, inputs, where)
    for name, var in func.inputs.items():
        state = is_state(var)
        if name in given:
            value = given[name]
        else:  # a state left out (check_sample requires every other input)
            wrapped = var.sym_type.wrapped_type()
            value = np.zeros(
                wrapped.get_shape(), types.nptype_from_builtin(wrapped.get_primitive())
            )
        env[id(var)] = _state_cell(value, var) if state else conform(value, var)
    return env


def _state_cell(value: np.ndarray, var) -> StateCell:
    """A state's starting value in the interpreter's form (fp16 as float32), copied."""
    if var.sym_type.wrapped_type().get_primitive() == types.fp16:
        return StateCell(np.asarray(value, np.float16).astype(np.float32))
    return StateCell(np.array(value))


class StopRun(Exception):
    """Raised by an observer to end a run once it has what it needs (`evaluate_program`
    returns None then)."""


def evaluate_program(
    prog,
    inputs: Mapping[str, Any],
    function: str = "main",
    cache: dict | None = None,
    observers: Mapping | None = None,
) -> dict[str, np.ndarray] | None:
    """Run `function` of `prog` on `inputs` (name -> array); returns output name -> array.

    Pass the same `cache` dict to several calls on one program to decode its constexpr weights
    once. `observers`: see `run_block`; when one raises `StopRun`, the run ends and this
    returns None.
    """
    func = prog.functions[function]
    checked = ("supported", id(func))
    if cache is None or checked not in cache:  # a cached program was checked on its first run
        check_supported(prog, function)
        if cache is not None:
            cache[checked] = True
    env = input_env(func, inputs)
    try:
        results = run_block(func, env, None, cache, observers)
    except StopRun:
        return None
    return {
        var.name: external_value(val, var) for var, val in zip(func.outputs, results, strict=True)
    }


def static_values(op, cache: dict | None = None) -> list:
    """The output values of a const or constexpr op (a whole constexpr chain decoded), in the
    interpreter's form; taken from, and stored in, `cache` like `run_block` does."""
    if not is_static(op):
        raise ValueError(f"{op.op_type} {op.name!r} is not a const or constexpr op")
    if cache is not None and id(op) in cache:
        return cache[id(op)]
    load_kernels()
    values = {}
    for name, var in op.inputs.items():
        if isinstance(var, (list, tuple)):
            raise ValueError(f"{op.op_type} {op.name!r} has a list operand")
        if var.op is not None and is_static(var.op):
            values[name] = static_values(var.op, cache)[var.op.outputs.index(var)]
        else:
            values[name] = _read({}, var)
    result = KERNELS[op.op_type](op, values, None)
    results = result if len(op.outputs) > 1 else (result,)
    out = [conform(value, var) for value, var in zip(results, op.outputs, strict=True)]
    if cache is not None:
        cache[id(op)] = out
    return out
