"""Shape, indexing and data-movement kernels of the reference interpreter."""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil.mil import types
from milsparse.ir.interpreter import kernel
from milsparse.ir.kernels_math import _scalar


def _ints(value):
    return [int(a) for a in np.atleast_1d(value)]


@kernel("const")
def const(op, v, ctx):
    return op.outputs[0].val


@kernel("cast")
def cast(op, v, ctx):
    target = types.nptype_from_builtin(types.string_to_builtin(str(v["dtype"])))
    return np.asarray(v["x"]).astype(np.bool_ if target is bool else target)


@kernel("reshape")
def reshape(op, v, ctx):
    x = np.asarray(v["x"])
    shape = _ints(v["shape"])
    # MIL: 0 copies the input's dimension at that position, -1 is inferred
    shape = [x.shape[i] if d == 0 and i < x.ndim else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@kernel("reshape_like")
def reshape_like(op, v, ctx):
    return np.asarray(v["x"]).reshape(op.outputs[0].shape)


@kernel("transpose")
def transpose(op, v, ctx):
    return np.transpose(v["x"], _ints(v["perm"]))


@kernel("expand_dims")
def expand_dims(op, v, ctx):
    x = np.asarray(v["x"])
    out_rank = x.ndim + len(_ints(v["axes"]))
    axes = sorted(a % out_rank for a in _ints(v["axes"]))
    for a in axes:
        x = np.expand_dims(x, a)
    return x


@kernel("squeeze")
def squeeze(op, v, ctx):
    x = np.asarray(v["x"])
    if v.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(a % x.ndim for a in _ints(v["axes"])))


@kernel("flatten2d")
def flatten2d(op, v, ctx):
    x = np.asarray(v["x"])
    axis = int(_scalar(v.get("axis"), 1)) % max(x.ndim, 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@kernel("concat")
def concat(op, v, ctx):
    values = [np.asarray(a) for a in v["values"]]
    axis = int(_scalar(v["axis"]))
    if bool(_scalar(v.get("interleave"), False)):
        stacked = np.stack(values, axis=axis + 1 if axis >= 0 else axis)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@kernel("stack")
def stack(op, v, ctx):
    return np.stack([np.asarray(a) for a in v["values"]], axis=int(_scalar(v["axis"])))


@kernel("split")
def split(op, v, ctx):
    x = np.asarray(v["x"])
    axis = int(_scalar(v["axis"]))
    if v.get("split_sizes") is not None:
        bounds = np.cumsum(_ints(v["split_sizes"]))[:-1]
        return tuple(np.split(x, bounds, axis=axis))
    return tuple(np.split(x, int(_scalar(v["num_splits"])), axis=axis))


@kernel("slice_by_index")
def slice_by_index(op, v, ctx):
    x = np.asarray(v["x"])
    index, squeeze_axes = _slice_index(v, x.ndim)
    out = x[index]
    return np.squeeze(out, axis=squeeze_axes) if squeeze_axes else out


@kernel("slice_update")
def slice_update(op, v, ctx):
    """x with the region `slice_by_index` would read replaced by `update` (iOS18; how
    stateful models write a step into their KV cache)."""
    x = np.asarray(v["x"])
    index, squeeze_axes = _slice_index(v, x.ndim)
    out = x.copy()
    region = out[index]
    update = np.asarray(v["update"], dtype=out.dtype)
    if squeeze_axes:
        update = np.expand_dims(update, squeeze_axes)
    out[index] = update.reshape(region.shape)
    return out


def _slice_index(v, n: int):
    """(index tuple, squeezed axes) of slice_by_index's begin/end/stride and masks."""
    begin, end = _ints(v["begin"]), _ints(v["end"])
    stride = _ints(v["stride"]) if v.get("stride") is not None else [1] * n
    begin_mask = _ints(v["begin_mask"]) if v.get("begin_mask") is not None else [0] * n
    end_mask = _ints(v["end_mask"]) if v.get("end_mask") is not None else [0] * n
    squeeze_mask = _ints(v["squeeze_mask"]) if v.get("squeeze_mask") is not None else [0] * n
    index, squeeze_axes = [], []
    for i in range(n):
        if squeeze_mask[i]:
            index.append(slice(begin[i], begin[i] + 1 if begin[i] != -1 else None))
            squeeze_axes.append(i)
            continue
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        index.append(slice(b, e, stride[i]))
    return tuple(index), tuple(squeeze_axes)


@kernel("slice_by_size")
def slice_by_size(op, v, ctx):
    x = np.asarray(v["x"])
    begin, size = _ints(v["begin"]), _ints(v["size"])
    index = tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size, strict=True))
    return x[index]


def _gather(x, indices, axis, batch_dims):
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    return np.stack(
        [_gather(x[i], indices[i], axis - 1, batch_dims - 1) for i in range(x.shape[0])]
    )


@kernel("gather")
def gather(op, v, ctx):
    x, indices = np.asarray(v["x"]), np.asarray(v["indices"]).astype(np.int64)
    axis = int(_scalar(v.get("axis"), 0)) % x.ndim
    return _gather(x, indices, axis, int(_scalar(v.get("batch_dims"), 0)))


@kernel("gather_along_axis")
def gather_along_axis(op, v, ctx):
    x = np.asarray(v["x"])
    return np.take_along_axis(
        x, np.asarray(v["indices"]).astype(np.int64), int(_scalar(v.get("axis"), 0))
    )


@kernel("gather_nd")
def gather_nd(op, v, ctx):
    x, indices = np.asarray(v["x"]), np.asarray(v["indices"]).astype(np.int64)
    return x[tuple(np.moveaxis(indices, -1, 0))]


_SCATTER_UFUNCS = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.true_divide,
    "max": np.maximum,
    "min": np.minimum,
}


def _scatter_into(target, index, updates, mode):
    if mode == "update":
        target[index] = updates
    else:
        _SCATTER_UFUNCS[mode].at(target, index, updates)


@kernel("scatter")
def scatter(op, v, ctx):
    out = np.array(v["data"], copy=True)
    indices = np.asarray(v["indices"]).astype(np.int64)
    axis = int(_scalar(v.get("axis"), 0)) % out.ndim
    moved = np.moveaxis(out, axis, 0)  # a view: writes land in `out`
    updates = np.moveaxis(np.asarray(v["updates"]), axis, 0)
    _scatter_into(moved, indices, updates, v.get("mode", "update"))
    return out


@kernel("scatter_nd")
def scatter_nd(op, v, ctx):
    out = np.array(v["data"], copy=True)
    indices = np.asarray(v["indices"]).astype(np.int64)
    index = tuple(np.moveaxis(indices, -1, 0))
    _scatter_into(out, index, np.asarray(v["updates"]), v.get("mode", "update"))
    return out


@kernel("scatter_along_axis")
def scatter_along_axis(op, v, ctx):
    out = np.array(v["data"], copy=True)
    indices = np.asarray(v["indices"]).astype(np.int64)
    axis = int(_scalar(v.get("axis"), 0))
    updates = np.asarray(v["updates"])
    if v.get("mode", "update") == "add":
        np.put_along_axis(out, indices, np.take_along_axis(out, indices, axis) + updates, axis)
    else:
        np.put_along_axis(out, indices, updates, axis)
    return out


@kernel("tile")
def tile(op, v, ctx):
    return np.tile(v["x"], _ints(v["reps"]))


@kernel("shape")
def shape(op, v, ctx):
    return np.asarray(np.shape(v["x"]), dtype=np.int32)


@kernel("fill")
def fill(op, v, ctx):
    return np.full(_ints(v["shape"]), _scalar(v.get("value"), 0.0))


@kernel("fill_like")
def fill_like(op, v, ctx):
    return np.full(np.shape(v["ref_tensor"]), _scalar(v.get("value"), 0.0))


@kernel("range_1d")
def range_1d(op, v, ctx):
    return np.arange(_scalar(v["start"]), _scalar(v["end"]), _scalar(v["step"]))


@kernel("band_part")
def band_part(op, v, ctx):
    x = np.asarray(v["x"])
    lower, upper = int(_scalar(v.get("lower"), -1)), int(_scalar(v.get("upper"), -1))
    rows, cols = x.shape[-2:]
    i, j = np.arange(rows)[:, None], np.arange(cols)[None, :]
    keep = np.ones((rows, cols), bool)
    if lower >= 0:
        keep &= (i - j) <= lower
    if upper >= 0:
        keep &= (j - i) <= upper
    return np.where(keep, x, 0)


@kernel("one_hot")
def one_hot(op, v, ctx):
    indices = np.asarray(v["indices"]).astype(np.int64)
    depth = int(_scalar(v["one_hot_vector_size"]))
    axis = int(_scalar(v.get("axis"), -1))
    on, off = _scalar(v.get("on_value"), 1), _scalar(v.get("off_value"), 0)
    hot = np.arange(depth) == indices[..., None]
    out = np.where(hot, on, off)
    return np.moveaxis(out, -1, axis) if axis != -1 else out


@kernel("reverse")
def reverse(op, v, ctx):
    x = np.asarray(v["x"])
    axes = _ints(v["axes"]) if v.get("axes") is not None else list(range(x.ndim))
    return np.flip(x, axis=tuple(axes))


@kernel("argsort")
def argsort(op, v, ctx):
    x = np.asarray(v["x"])
    axis = int(_scalar(v.get("axis"), -1))
    ascending = bool(_scalar(v.get("ascending"), False))
    return np.argsort(x if ascending else -x, axis=axis, kind="stable").astype(np.int32)


@kernel("topk")
def topk(op, v, ctx):
    x = np.asarray(v["x"])
    k = int(_scalar(v.get("k"), 1))
    axis = int(_scalar(v.get("axis"), -1))
    ascending = bool(_scalar(v.get("ascending"), False))
    order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
    order = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(x, order, axis), order.astype(np.int32)


@kernel("non_zero")
def non_zero(op, v, ctx):
    return np.argwhere(np.asarray(v["x"])).astype(np.int32)


@kernel("pixel_shuffle")
def pixel_shuffle(op, v, ctx):
    x = np.asarray(v["x"])
    r = int(_scalar(v["upscale_factor"]))
    n, c, h, w = x.shape
    out = x.reshape(n, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
    return out.reshape(n, c // (r * r), h * r, w * r)


@kernel("depth_to_space")
def depth_to_space(op, v, ctx):
    x = np.asarray(v["x"])
    r = int(_scalar(v["block_size"]))
    n, c, h, w = x.shape
    out = x.reshape(n, r, r, c // (r * r), h, w).transpose(0, 3, 4, 1, 5, 2)
    return out.reshape(n, c // (r * r), h * r, w * r)


@kernel("space_to_depth")
def space_to_depth(op, v, ctx):
    x = np.asarray(v["x"])
    r = int(_scalar(v["block_size"]))
    n, c, h, w = x.shape
    out = x.reshape(n, c, h // r, r, w // r, r).transpose(0, 3, 5, 1, 2, 4)
    return out.reshape(n, c * r * r, h // r, w // r)
