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
weights decoded into a `cache` are held that way too (float32: twice their fp16 size).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from coremltools.converters.mil.mil import types
from milsparse.ir.blobs import release_pages
from milsparse.ir.errors import UnsupportedOpError
from milsparse.ir.samples import check_sample, is_state

__all__ = [
    "KERNELS",
    "kernel",
    "unsupported_ops",
    "evaluate_program",
    "run_block",
    "static_values",
    "StopRun",
    "Cursor",
    "top_level_op",
    "StateCell",
    "run_samples",
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
    _load_kernels()
    return sorted(
        {op.op_type for op in _all_ops(prog.functions[function]) if op.op_type not in KERNELS}
    )


def _np_dtype(var):
    dtype = var.dtype
    if types.is_tensor(var.sym_type):
        dtype = var.sym_type.get_primitive()
    try:
        dtype = types.nptype_from_builtin(dtype)
    except Exception:  # strings, lists, states: leave as produced
        return None
    return np.bool_ if dtype is bool else np.dtype(dtype).type


# the bit path costs ~8 us of fixed numpy-call overhead; the cast ~3 ns per element
ROUND_BY_CAST_BELOW = 3072
# Slabs of the bit path: its temporaries stay in cache and are reused, where whole-array
# temporaries cost a fresh allocation (and its page faults) each, several per call.
_ROUND_SLAB = 1 << 17


def round_to_fp16(x: np.ndarray) -> np.ndarray:
    """float32 `x` rounded to the nearest float16 value (ties to even), kept as float32.

    Equal, bit for bit, to `x.astype(np.float16).astype(np.float32)`, and about 3x faster,
    a cache-sized slab at a time: normal-range values are rounded with integer ops on the bits;
    values in fp16's subnormal range (softmax tails are full of them) to multiples of 2**-24 by
    `rint(x * 2**24) * 2**-24`, exact in float32; only values that overflow to inf (and inf,
    nan) take numpy's cast. Below `ROUND_BY_CAST_BELOW` elements the cast is used throughout.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size < ROUND_BY_CAST_BELOW:
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    out = np.empty_like(x)
    src, dst = x.reshape(-1).view(np.uint32), out.reshape(-1).view(np.uint32)
    slab = min(src.size, _ROUND_SLAB)
    magnitude = np.empty(slab, np.uint32)
    huge, small = np.empty(slab, bool), np.empty(slab, bool)
    scaled = np.empty(slab, np.float32)
    for start in range(0, src.size, slab):
        stop = min(src.size, start + slab)
        n = stop - start
        u, bits, mag = src[start:stop], dst[start:stop], magnitude[:n]
        np.bitwise_and(u, np.uint32(0x7FFFFFFF), out=mag)
        np.greater(mag, np.uint32(0x477FEFFF), out=huge[:n])  # rounds to inf (>= 65520), nan
        mag -= np.uint32(1)  # zero wraps to the top and stays out of the next test
        np.less(mag, np.uint32(0x387FFFFF), out=small[:n])  # nonzero below 2**-14
        np.right_shift(u, np.uint32(13), out=bits)
        bits &= np.uint32(1)
        bits += np.uint32(0xFFF)
        bits += u
        bits &= np.uint32(0xFFFFE000)
        if small[:n].any():
            sub = scaled[:n]
            np.multiply(u.view(np.float32), np.float32(2.0**24), out=sub)
            np.rint(sub, out=sub)
            sub *= np.float32(2.0**-24)
            np.copyto(bits.view(np.float32), sub, where=small[:n])
        if huge[:n].any():
            where = np.flatnonzero(huge[:n])
            with np.errstate(over="ignore"):  # overflow to inf is the right answer here
                values = u[where].view(np.float32).astype(np.float16).astype(np.float32)
            bits[where] = values.view(np.uint32)
    return out


# Ops whose float outputs are input values moved around (or the larger/smaller of two, or a
# bound: clip's alpha and beta are fp16 operands of an fp16 op): when the inputs are fp16
# values, so are the outputs, and rounding again would change nothing.
VALUE_PRESERVING = frozenset(
    {
        "reshape", "reshape_like", "transpose", "squeeze", "expand_dims", "flatten2d",
        "slice_by_index", "slice_by_size", "split", "concat", "stack", "tile", "reverse",
        "gather", "gather_along_axis", "gather_nd", "identity", "relu", "relu6", "clip",
        "max_pool",
        "reduce_max", "reduce_min", "maximum", "minimum", "select", "abs", "depth_to_space",
        "space_to_depth", "pixel_shuffle", "upsample_nearest_neighbor", "while_loop", "cond",
    }
)  # fmt: skip

_LEAVE, _ROUND_FP16, _CAST = 0, 1, 2


def _conform(value, var):
    """Bring a kernel's result to the var's MIL dtype; fp16 values are held as float32 arrays of
    fp16-representable numbers (the rounding happens here)."""
    return _conform_to(value, *_output_rule(var, preserves=False))


def _output_rule(var, preserves: bool) -> tuple[int, Any]:
    dtype = _np_dtype(var)
    if dtype is None:
        return _LEAVE, None
    if dtype is np.float16:
        return (_CAST if preserves else _ROUND_FP16), np.float32
    return _CAST, dtype


def _conform_to(value, rule: int, dtype):
    if rule == _LEAVE or isinstance(value, (list, tuple, str)):
        return value
    arr = np.asarray(value)
    if rule == _ROUND_FP16:
        if arr.dtype == np.float16:
            return arr.astype(np.float32)
        return round_to_fp16(arr)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def _external(value, var):
    """A value as the program's caller sees it: fp16 vars as float16 arrays."""
    if _np_dtype(var) is np.float16:
        return np.asarray(value, dtype=np.float16)
    return np.asarray(value)


class Context:
    """What control-flow kernels need: running nested blocks with the enclosing values (and
    the run's observers)."""

    def __init__(self, env: dict, cache: dict | None, observers: Mapping | None = None):
        self.env = env
        self.cache = cache
        self.observers = observers

    def run(self, block, inputs: list) -> list:
        return run_block(block, self.env, inputs, self.cache, self.observers)


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


class _Step:
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
        self.rules = [_output_rule(var, preserves) for var in op.outputs]
        self.static = _is_static(op)
        self.free = [id(var) for var in freed]


def _plan(block, cache: dict | None) -> list[_Step]:
    key = ("plan", id(block))
    if cache is not None and key in cache:
        return cache[key]
    freed = _last_uses(block)
    steps = [_Step(op, freed.get(i, ())) for i, op in enumerate(block.operations)]
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
    env = _ChainedEnv(outer_env)
    for var, value in zip(block.inputs, inputs or [], strict=False):
        env[id(var)] = value
    _execute(_plan(block, cache), env, cache, observers)
    return [_read(env, v) for v in block.outputs]


def _execute(steps, env, cache: dict | None, observers: Mapping | None) -> None:
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
            env[key] = _conform_to(value, *rule)
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
            kernels_state,
            kernels_tensor,
        )

        _KERNEL_MODULES_LOADED = True


def _check_supported(prog, function: str) -> None:
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


def _input_env(func, inputs: Mapping[str, Any], where: str = "inputs") -> _ChainedEnv:
    """A top-level env holding the function's inputs (checked by `samples.check_sample`, in the
    interpreter's form). A state input starts from its entry in `inputs` when there is one,
    else from zeros."""
    env = _ChainedEnv(None)
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
        env[id(var)] = _state_cell(value, var) if state else _conform(value, var)
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
        _check_supported(prog, function)
        if cache is not None:
            cache[checked] = True
    env = _input_env(func, inputs)
    try:
        results = run_block(func, env, None, cache, observers)
    except StopRun:
        return None
    return {var.name: _external(val, var) for var, val in zip(func.outputs, results, strict=True)}


def static_values(op, cache: dict | None = None) -> list:
    """The output values of a const or constexpr op (a whole constexpr chain decoded), in the
    interpreter's form; taken from, and stored in, `cache` like `run_block` does."""
    if not _is_static(op):
        raise ValueError(f"{op.op_type} {op.name!r} is not a const or constexpr op")
    if cache is not None and id(op) in cache:
        return cache[id(op)]
    _load_kernels()
    values = {}
    for name, var in op.inputs.items():
        if isinstance(var, (list, tuple)):
            raise ValueError(f"{op.op_type} {op.name!r} has a list operand")
        if var.op is not None and _is_static(var.op):
            values[name] = static_values(var.op, cache)[var.op.outputs.index(var)]
        else:
            values[name] = _read({}, var)
    result = KERNELS[op.op_type](op, values, None)
    results = result if len(op.outputs) > 1 else (result,)
    out = [_conform(value, var) for value, var in zip(results, op.outputs, strict=True)]
    if cache is not None:
        cache[id(op)] = out
    return out


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
    if not _is_static(op):
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
        _load_kernels()
        _check_supported(prog, function)
        self._envs = [
            _input_env(func, sample, f"input sample {i}" if len(samples) > 1 else "inputs")
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

    def _pending(self) -> list[_Step]:
        func = self._func()
        freed = _last_uses(func)
        return [
            _Step(op, freed.get(i, ()))
            for i, op in enumerate(func.operations)
            if id(op) not in self._done
        ]

    def reached(self, op) -> bool:
        """Whether the top-level op holding `op` has run (a probe of it would come too late)."""
        return id(top_level_op(op, self._func())) in self._done

    def _index(self, steps: list[_Step], op) -> int:
        top = top_level_op(op, self._func())
        for i, step in enumerate(steps):
            if step.op is top:
                return i
        raise ValueError(f"op {op.name!r} has already run")

    def _drop_dead(self, steps: list[_Step]) -> None:
        """Forget values no op still to run reads (those of ops a pass removed, for one)."""
        live = {id(var) for var in self._func().outputs}
        for step in steps:
            for reader in _all_ops_in(step.op):
                for value in reader.inputs.values():
                    for var in value if isinstance(value, (list, tuple)) else (value,):
                        live.add(id(var))
        for env in self._envs:
            for key in [k for k in env if k not in live]:
                del env[key]

    def _stretches(self, steps: list[_Step]) -> list[list[_Step]]:
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
                    _execute(stretch, env, cache, observers)
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
            scratch = _ChainedEnv(env)
            self.current_sample = i
            try:
                _execute(steps, scratch, cache, observers)
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
            {var.name: _external(env[id(var)], var) for var in func.outputs} for env in self._envs
        ]


def run_samples(prog, samples: list[Mapping[str, Any]], function: str = "main") -> list[dict]:
    """Each sample's outputs of `function`, the samples run together (a `Cursor`: each weight
    decoded once for all of them, a stretch at a time)."""
    cursor = Cursor(prog, samples, function)
    cursor.advance()
    return cursor.outputs()
