"""fp16 numerics of the reference interpreter: how a kernel's result takes its var's dtype.

Every floating tensor is computed in float32 and rounded to the dtype of the op's output var
when the kernel returns: fp16 values are held as float32 arrays of fp16-representable numbers
(`round_to_fp16`, a faster bit-exact `astype(float16).astype(float32)`), and ops that only move
values (`VALUE_PRESERVING`) skip the rounding. `external_value` gives the caller float16.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from coremltools.converters.mil.mil import types

__all__ = [
    "ROUND_BY_CAST_BELOW",
    "VALUE_PRESERVING",
    "conform",
    "conform_to",
    "external_value",
    "np_dtype_of",
    "output_rule",
    "round_to_fp16",
]


def np_dtype_of(var):
    """The numpy scalar type of a var's values (None for strings, lists and states)."""
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


def conform(value, var):
    """Bring a kernel's result to the var's MIL dtype; fp16 values are held as float32 arrays of
    fp16-representable numbers (the rounding happens here)."""
    return conform_to(value, *output_rule(var, preserves=False))


def output_rule(var, preserves: bool) -> tuple[int, Any]:
    dtype = np_dtype_of(var)
    if dtype is None:
        return _LEAVE, None
    if dtype is np.float16:
        return (_CAST if preserves else _ROUND_FP16), np.float32
    return _CAST, dtype


def conform_to(value, rule: int, dtype):
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


def external_value(value, var):
    """A value as the program's caller sees it: fp16 vars as float16 arrays."""
    if np_dtype_of(var) is np.float16:
        return np.asarray(value, dtype=np.float16)
    return np.asarray(value)
