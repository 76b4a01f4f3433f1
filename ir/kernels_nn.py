"""Layer kernels: linear algebra, convolution, pooling, resizing, attention and recurrences.

Convolutions are im2col (one strided copy per kernel tap) followed by one batched BLAS matmul
per group; transposed convolutions accumulate one matmul per kernel tap. No Python loop runs per
element or per output pixel (recurrences loop over time steps only).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from milsparse.ir.interpreter import kernel
from milsparse.ir.kernels_math import _scalar, _sigmoid


def _ints(v, name, default):
    value = v.get(name)
    if value is None:
        return list(default)
    return [int(a) for a in np.atleast_1d(value)]


def _gemm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x[..., K] @ w[K, N] as one 2-D GEMM over all leading dims (a 3-D matmul against a
    transposed weight runs one small GEMM per batch row, about twice as slow)."""
    lead = x.shape[:-1]
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
    return np.matmul(flat, w).reshape(*lead, w.shape[-1])


@kernel("linear")
def linear(op, v, ctx):
    # weight [N, K]: its transpose is a view BLAS reads as a transposed operand, no copy
    out = _gemm(np.asarray(v["x"]), np.asarray(v["weight"]).T)
    if v.get("bias") is not None:
        out += v["bias"]
    return out


@kernel("matmul")
def matmul(op, v, ctx):
    x, y = np.asarray(v["x"]), np.asarray(v["y"])
    if bool(_scalar(v.get("transpose_x"), False)):
        x = np.swapaxes(x, -1, -2)
    if bool(_scalar(v.get("transpose_y"), False)):
        y = np.swapaxes(y, -1, -2)
    if y.ndim == 2 and x.ndim > 2:  # activations against a weight: one 2-D GEMM
        return _gemm(x, y)
    return np.matmul(x, y)


@kernel("einsum")
def einsum(op, v, ctx):
    return np.einsum(str(v["equation"]), *v["values"], optimize=True)


def _same_pads(sizes, kernels, strides, lower: bool):
    pads = []
    for size, k, s in zip(sizes, kernels, strides, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        small, big = total // 2, total - total // 2
        pads.append((big, small) if lower else (small, big))
    return pads


def _pads(v, sizes, kernels, strides, ceil_mode=False):
    """[(begin, end)] per spatial dim for pad_type valid | same | same_lower | custom."""
    pad_type = v.get("pad_type", "valid")
    if pad_type in ("same", "same_lower"):
        return _same_pads(sizes, kernels, strides, pad_type == "same_lower")
    if pad_type == "custom":
        flat = _ints(v, "pad", [0] * 2 * len(sizes))
        pads = [(flat[2 * i], flat[2 * i + 1]) for i in range(len(sizes))]
    else:
        pads = [(0, 0)] * len(sizes)
    if ceil_mode:
        adjusted = []
        for (b, e), size, k, s in zip(pads, sizes, kernels, strides, strict=True):
            span = size + b + e - k
            extra = (-span) % s if span % s else 0
            adjusted.append((b, e + extra))
        pads = adjusted
    return pads


def _pad_constant(x, pads, fill=0.0):
    """x [N, C, *spatial] with `pads` [(begin, end)] around its spatial dims, filled with
    `fill` (an allocation and one copy; np.pad costs more than the copy on small tensors)."""
    if not any(b or e for b, e in pads):
        return x
    shape = x.shape[:2] + tuple(
        size + b + e for size, (b, e) in zip(x.shape[2:], pads, strict=True)
    )
    out = np.full(shape, fill, dtype=x.dtype)
    out[
        (slice(None), slice(None))
        + tuple(slice(b, b + size) for size, (b, _) in zip(x.shape[2:], pads, strict=True))
    ] = x
    return out


def _tap_index(offset, dilations, sizes, strides):
    """Index into [N, C, *spatial] of the `sizes` positions, `strides` apart, that kernel tap
    `offset` (spread by `dilations`) touches."""
    return (slice(None), slice(None)) + tuple(
        slice(o * d, o * d + (size - 1) * s + 1, s)
        for o, d, size, s in zip(offset, dilations, sizes, strides, strict=True)
    )


@kernel("conv")
def conv(op, v, ctx):
    x, w = np.asarray(v["x"], dtype=np.float32), np.asarray(v["weight"], dtype=np.float32)
    nd = x.ndim - 2
    strides = _ints(v, "strides", [1] * nd)
    dilations = _ints(v, "dilations", [1] * nd)
    groups = int(_scalar(v.get("groups"), 1))
    kernels = list(w.shape[2:])
    effective = [(k - 1) * d + 1 for k, d in zip(kernels, dilations, strict=True)]
    pads = _pads(v, x.shape[2:], effective, strides)
    out_sizes = [
        (size + b + e - k) // s + 1
        for size, (b, e), k, s in zip(x.shape[2:], pads, effective, strides, strict=True)
    ]
    n, c = x.shape[:2]
    cout, cg = w.shape[0], w.shape[1]
    taps = int(np.prod(kernels))
    if cg == 1 and groups == c and cout == c and c >= 2 * out_sizes[-1]:
        out = _depthwise_channels_last(x, pads, w, kernels, dilations, out_sizes, strides)
        return _add_bias(out, v, cout, nd)
    x = _pad_constant(x, pads)
    if cg == 1 and groups == c and cout == c:
        out = _depthwise(x, w, kernels, dilations, out_sizes, strides)
    elif taps == 1 and all(s == 1 for s in strides):
        # pointwise: the input is its own im2col; one GEMM per sample
        out = np.matmul(w.reshape(groups, cout // groups, cg), x.reshape(n, groups, cg, -1))
    else:
        # im2col, one strided copy per kernel tap: [N, C, K, *out] -> [N, G, Cg*K, P]
        cols = np.empty((n, c, taps, *out_sizes), dtype=np.float32)
        for tap, offset in enumerate(np.ndindex(*kernels)):
            cols[:, :, tap] = x[_tap_index(offset, dilations, out_sizes, strides)]
        cols = cols.reshape(n, groups, cg * taps, -1)
        out = np.matmul(w.reshape(groups, cout // groups, cg * taps), cols)  # N, G, Og, P
    return _add_bias(out.reshape(n, cout, *out_sizes), v, cout, nd)


def _add_bias(out, v, cout, nd):
    if v.get("bias") is not None:
        out += np.asarray(v["bias"], dtype=np.float32).reshape([1, cout] + [1] * nd)
    return out


def _depthwise(x, w, kernels, dilations, out_sizes, strides):
    """One filter per channel on a padded NCHW input: a multiply-add per kernel tap over the
    whole tensor (im2col would run one 1-row GEMM per channel)."""
    taps = w.reshape(w.shape[0], -1)
    weight_shape = (1, -1) + (1,) * len(out_sizes)
    out = np.empty((x.shape[0], x.shape[1], *out_sizes), dtype=np.float32)
    scratch = np.empty_like(out)
    for tap, offset in enumerate(np.ndindex(*kernels)):
        target = out if tap == 0 else scratch
        np.multiply(
            x[_tap_index(offset, dilations, out_sizes, strides)],
            taps[:, tap].reshape(weight_shape),
            out=target,
        )
        if tap:
            out += scratch
    return out


def _depthwise_channels_last(x, pads, w, kernels, dilations, out_sizes, strides):
    """`_depthwise` with the channels innermost. numpy pays per inner loop, and in NCHW the
    loop runs along the output width, short deep in a CNN (7 to 14); here it runs along the
    channels (hundreds). The input is padded straight into a channels-last buffer; the result
    is returned as an NCHW view."""
    n, c = x.shape[:2]
    padded = np.zeros(
        (n, *(size + b + e for size, (b, e) in zip(x.shape[2:], pads, strict=True)), c),
        dtype=np.float32,
    )
    interior = tuple(slice(b, b + size) for size, (b, _) in zip(x.shape[2:], pads, strict=True))
    padded[(slice(None), *interior)] = np.moveaxis(x, 1, -1)
    taps = np.ascontiguousarray(w.reshape(c, -1).T)  # [K, C]
    out = np.empty((n, *out_sizes, c), dtype=np.float32)
    scratch = np.empty_like(out)
    for tap, offset in enumerate(np.ndindex(*kernels)):
        index = _tap_index(offset, dilations, out_sizes, strides)
        target = out if tap == 0 else scratch
        np.multiply(padded[(index[0], *index[2:])], taps[tap], out=target)
        if tap:
            out += scratch
    return np.moveaxis(out, -1, 1)


@kernel("conv_transpose")
def conv_transpose(op, v, ctx):
    x, w = np.asarray(v["x"], dtype=np.float32), np.asarray(v["weight"], dtype=np.float32)
    nd = x.ndim - 2
    strides = _ints(v, "strides", [1] * nd)
    dilations = _ints(v, "dilations", [1] * nd)
    groups = int(_scalar(v.get("groups"), 1))
    n, cin = x.shape[:2]
    in_sizes = x.shape[2:]
    kernels = list(w.shape[2:])
    og = w.shape[1]
    cg = cin // groups
    full = [
        (i - 1) * s + (k - 1) * d + 1
        for i, s, k, d in zip(in_sizes, strides, kernels, dilations, strict=True)
    ]
    acc = np.zeros((n, groups * og, *full), dtype=np.float32)
    xg = x.reshape(n, groups, cg, -1)  # N, G, Cg, P
    wg = w.reshape(groups, cg, og, -1)  # G, Cg, Og, K
    for tap, offset in enumerate(np.ndindex(*kernels)):
        # [N, G, Og, P] contribution of one kernel tap, scattered with the stride
        part = np.matmul(wg[:, :, :, tap].transpose(0, 2, 1)[None], xg)
        part = part.reshape(n, groups * og, *in_sizes)
        acc[_tap_index(offset, dilations, in_sizes, strides)] += part
    out_shape = v.get("output_shape")
    pad_type = v.get("pad_type", "valid")
    if pad_type == "custom":
        flat = _ints(v, "pad", [0] * 2 * nd)
        pads = [(flat[2 * i], flat[2 * i + 1]) for i in range(nd)]
    elif pad_type in ("same", "same_lower"):
        pads = []
        for f, i, s in zip(full, in_sizes, strides, strict=True):
            total = max(f - i * s, 0)
            small, big = total // 2, total - total // 2
            pads.append((big, small) if pad_type == "same_lower" else (small, big))
    else:
        pads = [(0, 0)] * nd
    sizes = [f - b - e for f, (b, e) in zip(full, pads, strict=True)]
    if out_shape is not None:
        sizes = [int(s) for s in np.atleast_1d(out_shape)[-nd:]]
    out = np.zeros((n, groups * og, *sizes), dtype=np.float32)
    src = tuple(slice(b, min(b + s, f)) for (b, _), s, f in zip(pads, sizes, full, strict=True))
    dst = tuple(slice(0, min(b + s, f) - b) for (b, _), s, f in zip(pads, sizes, full, strict=True))
    out[(slice(None), slice(None)) + dst] = acc[(slice(None), slice(None)) + src]
    if v.get("bias") is not None:
        out = out + np.asarray(v["bias"]).reshape([1, -1] + [1] * nd)
    return out


def _pool(op, v, reduce_max: bool):
    x = np.asarray(v["x"], dtype=np.float32)
    nd = x.ndim - 2
    kernels = _ints(v, "kernel_sizes", [1] * nd)
    strides = _ints(v, "strides", [1] * nd)
    ceil_mode = bool(_scalar(v.get("ceil_mode"), False))
    pads = _pads(v, x.shape[2:], kernels, strides, ceil_mode)
    fill = -np.inf if reduce_max else 0.0
    padded = _pad_constant(x, pads, fill)
    total = _reduce_taps(padded, kernels, strides, np.maximum if reduce_max else np.add)
    if reduce_max:
        return total
    if bool(_scalar(v.get("exclude_padding_from_average"), False)):
        ones = _pad_constant(np.ones((1, 1) + x.shape[2:], np.float32), pads)
        return total / _reduce_taps(ones, kernels, strides, np.add)
    return total / float(np.prod(kernels))


def _reduce_taps(padded, kernels, strides, ufunc):
    """Reduce every pooling window of `padded` with `ufunc`, one strided slice per kernel tap
    (vectorised over the whole output; a reduction over window views is several times slower)."""
    nd = len(kernels)
    out_shape = [
        (size - k) // s + 1 for size, k, s in zip(padded.shape[2:], kernels, strides, strict=True)
    ]
    total = None
    for tap in itertools.product(*(range(k) for k in kernels)):
        view = padded[_tap_index(tap, [1] * nd, out_shape, strides)]
        if total is None:
            total = np.array(view, dtype=np.float32)
        else:
            ufunc(total, view, out=total)
    assert total is not None and total.ndim == nd + 2
    return total


@kernel("max_pool")
def max_pool(op, v, ctx):
    return _pool(op, v, True)


@kernel("avg_pool")
def avg_pool(op, v, ctx):
    return _pool(op, v, False)


@kernel("l2_pool")
def l2_pool(op, v, ctx):
    squared = dict(v)
    squared["x"] = np.square(np.asarray(v["x"], dtype=np.float32))
    k = float(np.prod(_ints(v, "kernel_sizes", [1])))
    return np.sqrt(_pool(op, squared, False) * k)


@kernel("upsample_nearest_neighbor")
def upsample_nearest_neighbor(op, v, ctx):
    x = np.asarray(v["x"])
    sh = float(_scalar(v.get("scale_factor_height"), 1))
    sw = float(_scalar(v.get("scale_factor_width"), 1))
    h, w = x.shape[-2:]
    out_h, out_w = int(math.floor(h * sh)), int(math.floor(w * sw))
    rows = np.minimum(np.floor(np.arange(out_h) / sh).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(out_w) / sw).astype(int), w - 1)
    return x[..., rows[:, None], cols[None, :]]


def _bilinear_axis(size, out, scale, align_corners, half_pixel):
    dst = np.arange(out, dtype=np.float64)
    if align_corners and out > 1:
        src = dst * (size - 1) / (out - 1)
    elif half_pixel:
        src = np.maximum((dst + 0.5) / scale - 0.5, 0)
    else:
        src = dst / scale
    src = np.clip(src, 0, size - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, size - 1)
    return lo, hi, (src - lo).astype(np.float32)


@kernel("upsample_bilinear")
def upsample_bilinear(op, v, ctx):
    x = np.asarray(v["x"], dtype=np.float32)
    sh = float(_scalar(v.get("scale_factor_height"), 1))
    sw = float(_scalar(v.get("scale_factor_width"), 1))
    align = bool(_scalar(v.get("align_corners"), False))
    half = bool(_scalar(v.get("half_pixel_centers"), not align))
    h, w = x.shape[-2:]
    r0, r1, fr = _bilinear_axis(h, int(math.floor(h * sh)), sh, align, half)
    c0, c1, fc = _bilinear_axis(w, int(math.floor(w * sw)), sw, align, half)
    top = x[..., r0, :] * (1 - fr)[:, None] + x[..., r1, :] * fr[:, None]
    return top[..., c0] * (1 - fc) + top[..., c1] * fc


@kernel("pad")
def pad(op, v, ctx):
    x = np.asarray(v["x"])
    flat = _ints(v, "pad", [])
    k = len(flat) // 2
    pads = [(0, 0)] * (x.ndim - k) + [(flat[2 * i], flat[2 * i + 1]) for i in range(k)]
    mode = v.get("mode", "constant")
    if mode == "constant":
        return np.pad(x, pads, constant_values=_scalar(v.get("constant_val"), 0.0))
    return np.pad(x, pads, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@kernel("scaled_dot_product_attention")
def scaled_dot_product_attention(op, v, ctx):
    q, k, val = (np.asarray(v[n], dtype=np.float32) for n in ("query", "key", "value"))
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.sqrt(q.shape[-1])
    mask = v.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.matmul(scores / scores.sum(axis=-1, keepdims=True), val)


_ACTIVATIONS = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
    "linear": lambda z: z,
    "hard_sigmoid": lambda z: np.clip(0.2 * z + 0.5, 0, 1),
    "scaled_tanh": np.tanh,
}


def _directions(v):
    direction = v.get("direction", "forward")
    return {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]


@kernel("lstm")
def lstm(op, v, ctx):
    x = np.asarray(v["x"], dtype=np.float32)  # [T, B, I]
    steps, batch = x.shape[:2]
    h0 = np.asarray(v["initial_h"], dtype=np.float32).reshape(batch, -1)
    c0 = np.asarray(v["initial_c"], dtype=np.float32).reshape(batch, -1)
    rec = _ACTIVATIONS[v.get("recurrent_activation", "sigmoid")]
    cell = _ACTIVATIONS[v.get("cell_activation", "tanh")]
    act = _ACTIVATIONS[v.get("activation", "tanh")]
    clip = v.get("clip")
    outs, hs, cs = [], [], []
    for d, backward in enumerate(_directions(v)):
        suffix = "_back" if d == 1 else ""
        w_ih, w_hh = np.asarray(v["weight_ih" + suffix]), np.asarray(v["weight_hh" + suffix])
        hidden = w_hh.shape[1]
        bias = v.get("bias" + suffix)
        bias = np.zeros(4 * hidden, np.float32) if bias is None else np.asarray(bias)
        peep = v.get("peephole" + suffix)
        peep = np.zeros(3 * hidden, np.float32) if peep is None else np.asarray(peep)
        h = h0[:, d * hidden : (d + 1) * hidden]
        c = c0[:, d * hidden : (d + 1) * hidden]
        pre = np.matmul(x, w_ih.T) + bias  # all input projections at once
        seq = []
        for t in range(steps - 1, -1, -1) if backward else range(steps):
            gates = pre[t] + h @ w_hh.T
            i, f, o, z = np.split(gates, 4, axis=-1)
            i = rec(i + peep[:hidden] * c)
            f = rec(f + peep[hidden : 2 * hidden] * c)
            z = cell(z)
            if clip is not None:
                z = np.clip(z, -float(clip), float(clip))
            c = f * c + i * z
            o = rec(o + peep[2 * hidden :] * c)
            h = o * act(c)
            seq.append(h)
        if backward:
            seq.reverse()
        outs.append(np.stack(seq))
        hs.append(h)
        cs.append(c)
    out = np.concatenate(outs, axis=-1)
    if not bool(_scalar(v.get("output_sequence"), False)):
        out = out[-1:] if len(outs) == 1 else np.concatenate([outs[0][-1:], outs[1][:1]], axis=-1)
    return out, np.concatenate(hs, axis=-1), np.concatenate(cs, axis=-1)


@kernel("gru")
def gru(op, v, ctx):
    x = np.asarray(v["x"], dtype=np.float32)
    steps, batch = x.shape[:2]
    w_ih, w_hh = np.asarray(v["weight_ih"]), np.asarray(v["weight_hh"])
    hidden = w_hh.shape[1]
    bias = v.get("bias")
    bias = np.zeros(3 * hidden, np.float32) if bias is None else np.asarray(bias)
    rec = _ACTIVATIONS[v.get("recurrent_activation", "sigmoid")]
    act = _ACTIVATIONS[v.get("activation", "tanh")]
    h = np.asarray(v["initial_h"], dtype=np.float32).reshape(batch, hidden)
    backward = _directions(v) == [True]
    pre = np.matmul(x, w_ih.T) + bias
    w_hr, w_ho, w_hz = np.split(w_hh, 3, axis=0)
    seq = []
    for t in range(steps - 1, -1, -1) if backward else range(steps):
        x_r, x_o, x_z = np.split(pre[t], 3, axis=-1)
        r = rec(x_r + h @ w_hr.T)
        z = rec(x_z + h @ w_hz.T)
        o = act(x_o + r * (h @ w_ho.T))
        h = (1 - z) * o + z * h
        seq.append(h)
    if backward:
        seq.reverse()
    out = np.stack(seq)
    if not bool(_scalar(v.get("output_sequence"), False)):
        out = out[-1:]
    return out, h
