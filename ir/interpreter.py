"""A numpy reference interpreter for MIL programs.

The shape of JAX's `eval_jaxpr`: a dict of values, `read`/`write`, one loop over the ops of a
block in order, multi-output ops, values freed after their last use. Kernels are pure numpy
functions in a table `op_type -> function`, filled by `@kernel("conv")` in the `kernels_*`
modules; a program with ops that have no kernel is refused, naming all of them, before anything
runs.

Precision: every floating tensor is computed in float32 (float16 inputs are widened when a
kernel reads them) and rounded to the dtype of the op's output var when the kernel returns, so
fp16 programs are rounded to fp16 at op boundaries, as Core ML's fp16 compute does at layer
granularity (inside an op Core ML may keep more or less precision than this).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from coremltools.converters.mil.mil import types
from milsparse.ir.errors import ConfigError, UnsupportedOpError

__all__ = ["KERNELS", "kernel", "unsupported_ops", "evaluate_program", "run_block"]

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
    _load_kernels()
    return sorted(
        {op.op_type for op in _all_ops(prog.functions[function]) if op.op_type not in KERNELS}
    )


def _np_dtype(var):
    dtype = var.dtype
    if types.is_tensor(var.sym_type):
        dtype = var.sym_type.get_primitive()
    try:
        return types.nptype_from_builtin(dtype)
    except Exception:  # strings, lists, states: leave as produced
        return None


def _conform(value, var):
    """Round a kernel's result to the var's MIL dtype (fp16 rounding happens here)."""
    dtype = _np_dtype(var)
    if dtype is None or isinstance(value, (list, tuple, str)):
        return value
    if dtype is bool:
        dtype = np.bool_
    arr = np.asarray(value)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def _widen(value):
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    if isinstance(value, np.float16):
        return np.float32(value)
    return value


class Context:
    """What control-flow kernels need: running nested blocks with the enclosing values."""

    def __init__(self, env: dict, cache: dict | None):
        self.env = env
        self.cache = cache

    def run(self, block, inputs: list) -> list:
        return run_block(block, self.env, inputs, self.cache)


def _is_static(op) -> bool:
    """consts and constexpr ops: their values never depend on the program's inputs."""
    return op.op_type == "const" or op.op_type.startswith("constexpr_")


def _last_uses(block) -> dict[int, list]:
    """op index -> vars whose last reader (in this block or its nested blocks) is that op."""
    last: dict[int, int] = {}
    var_of: dict[int, Any] = {}
    for i, op in enumerate(block.operations):
        for inner_op in _all_ops_in(op):
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


def _all_ops_in(op):
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


def run_block(
    block, outer_env: dict, inputs: list | None = None, cache: dict | None = None
) -> list:
    """Run `block`'s ops; its inputs take `inputs`; returns the values of `block.outputs`.

    `cache`, when given, keeps the (decoded) values of const and constexpr ops across runs.
    """
    env = _ChainedEnv(outer_env)
    for var, value in zip(block.inputs, inputs or [], strict=False):
        env[id(var)] = value
    ctx = Context(env, cache)
    freed = _last_uses(block)
    for i, op in enumerate(block.operations):
        if cache is not None and _is_static(op) and id(op) in cache:
            for var, value in zip(op.outputs, cache[id(op)], strict=True):
                env[id(var)] = value
            continue
        values = {}
        for name, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                values[name] = [_widen(_read(env, v)) for v in var]
            else:
                values[name] = _widen(_read(env, var))
        try:
            result = KERNELS[op.op_type](op, values, ctx)
        except (ValueError, TypeError, IndexError) as e:
            raise RuntimeError(f"kernel {op.op_type} failed on op {op.name!r}: {e}") from e
        outputs = op.outputs
        results = result if len(outputs) > 1 else (result,)
        for var, value in zip(outputs, results, strict=True):
            env[id(var)] = _conform(value, var)
        if cache is not None and _is_static(op):
            cache[id(op)] = [env[id(var)] for var in outputs]
        for var in freed.get(i, ()):
            env.pop_local(id(var))
    return [_read(env, v) for v in block.outputs]


def _read(env, var):
    try:
        return env[id(var)]
    except KeyError:
        if var.val is not None:  # a constant without a producing op in this scope
            return var.val
        raise RuntimeError(f"value {var.name!r} is read before it is computed") from None


class _ChainedEnv(dict):
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


def _load_kernels() -> None:
    global _KERNEL_MODULES_LOADED
    if not _KERNEL_MODULES_LOADED:
        from milsparse.ir import (  # noqa: F401  (import registers the kernels)
            kernels_constexpr,
            kernels_control,
            kernels_math,
            kernels_nn,
            kernels_tensor,
        )

        _KERNEL_MODULES_LOADED = True


def evaluate_program(
    prog, inputs: Mapping[str, Any], function: str = "main", cache: dict | None = None
) -> dict[str, np.ndarray]:
    """Run `function` of `prog` on `inputs` (name -> array); returns output name -> array.

    Pass the same `cache` dict to several calls on one program to decode its constexpr weights
    once.
    """
    missing = unsupported_ops(prog, function)
    if missing:
        raise UnsupportedOpError(
            f"the reference interpreter has no kernel for: {', '.join(missing)}"
        )
    func = prog.functions[function]
    feeds = []
    for name, var in func.inputs.items():
        if name not in inputs:
            raise ConfigError(f"missing input {name!r}; the program takes {list(func.inputs)}")
        value = np.asarray(inputs[name])
        expected = tuple(var.shape)
        fixed = all(isinstance(d, int) for d in expected)
        if value.ndim != len(expected) or (fixed and value.shape != expected):
            raise ConfigError(
                f"input {name!r} has shape {value.shape}; the program expects {expected}"
            )
        feeds.append(value)
    env = _ChainedEnv(None)
    for var, value in zip(func.inputs.values(), feeds, strict=True):
        env[id(var)] = _conform(value, var)
    ctx_outputs = run_block(func, env, None, cache)
    return {var.name: np.asarray(val) for var, val in zip(func.outputs, ctx_outputs, strict=True)}
