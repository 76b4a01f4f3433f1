"""Elementwise, activation, reduction and normalisation kernels of the reference interpreter."""

from __future__ import annotations

import numpy as np
from milsparse.ir.interpreter import kernel


def _f(x):
    return np.asarray(x)


def _scalar(v, default=None):
    if v is None:
        return default
    v = np.asarray(v)
    return v.item() if v.size == 1 else v


_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.true_divide,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "mod": np.mod,
    "equal": np.equal,
    "not_equal": np.not_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
}


def _binary(fn):
    def run(op, v, ctx):
        return fn(_f(v["x"]), _f(v["y"]))

    return run


for _name, _fn in _BINARY.items():
    kernel(_name)(_binary(_fn))


@kernel("floor_div")
def floor_div(op, v, ctx):
    return np.floor_divide(_f(v["x"]), _f(v["y"]))


# erf(x) = x * P(x^2) / Q(x^2) on |x| <= 3.92 (erf is 1 to within 1e-8 beyond): a (5, 5)
# rational approximation fitted for this interpreter by weighted linearised least squares
# against math.erf. Evaluated in float32 its error is below 3.3e-7 (about five float32 ulps
# near 1), and P(0) is 2/sqrt(pi) to 8e-8, so small arguments keep their relative accuracy.
_ERF_CLAMP = np.float32(3.92)
_ERF_P = np.array(
    [1.1283790773026772, 0.18924146210201787, 0.05264183722182817,
     0.003729574518208072, 0.0002865243847832849, 2.090793543491065e-06],
    dtype=np.float32,
)  # fmt: skip
_ERF_Q = np.array(
    [1.0, 0.5010431361685164, 0.11367114409931228, 0.014893559570318892,
     0.0011584480437578058, 3.8599972454672615e-05],
    dtype=np.float32,
)  # fmt: skip
# Work a slab at a time so that the dozen intermediate passes stay in cache.
_ERF_CHUNK = 1 << 14


_ONE = np.float32(1)


def _erf_into(x: np.ndarray, out: np.ndarray, scale: np.float32 = _ONE) -> None:
    """out[:] = erf(scale * x) for 1-D float32 arrays, in cache-sized slabs."""
    t = np.empty(min(x.size, _ERF_CHUNK), np.float32)
    num, den = np.empty_like(t), np.empty_like(t)
    for start in range(0, x.size, _ERF_CHUNK):
        stop = min(x.size, start + _ERF_CHUNK)
        n = stop - start
        xc, tt, p, q = out[start:stop], t[:n], num[:n], den[:n]
        np.multiply(x[start:stop], scale, out=xc)
        np.clip(xc, -_ERF_CLAMP, _ERF_CLAMP, out=xc)
        np.multiply(xc, xc, out=tt)
        p.fill(_ERF_P[-1])
        for c in _ERF_P[-2::-1]:
            p *= tt
            p += c
        q.fill(_ERF_Q[-1])
        for c in _ERF_Q[-2::-1]:
            q *= tt
            q += c
        xc *= p
        xc /= q
        np.clip(xc, -1, 1, out=xc)  # the fit overshoots 1 by an ulp near the clamp


def erf(x: np.ndarray) -> np.ndarray:
    """erf in float32, accurate to 3.3e-7 absolute (see `_ERF_P`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _erf_into(x.reshape(-1), out.reshape(-1))
    return out


def gelu_exact(x: np.ndarray) -> np.ndarray:
    """x * (1 + erf(x / sqrt(2))) / 2 in float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    flat, result = x.reshape(-1), out.reshape(-1)
    _erf_into(flat, result, np.float32(1 / np.sqrt(2)))
    result += 1
    result *= flat
    result *= np.float32(0.5)
    return out


def _sigmoid(x):
    x = _f(x)
    return np.where(
        x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x)))
    )


_UNARY = {
    "relu": lambda x, op, v: np.maximum(x, 0),
    "relu6": lambda x, op, v: np.clip(x, 0, 6),
    "sigmoid": lambda x, op, v: _sigmoid(x),
    "tanh": lambda x, op, v: np.tanh(x),
    "silu": lambda x, op, v: x * _sigmoid(x),
    "exp": lambda x, op, v: np.exp(x),
    "exp2": lambda x, op, v: np.exp2(x),
    "log": lambda x, op, v: np.log(x + _scalar(v.get("epsilon"), 0.0)),
    "sqrt": lambda x, op, v: np.sqrt(x),
    "rsqrt": lambda x, op, v: 1 / np.sqrt(x + _scalar(v.get("epsilon"), 1e-12)),
    "inverse": lambda x, op, v: 1 / (x + _scalar(v.get("epsilon"), 1e-4)),
    "abs": lambda x, op, v: np.abs(x),
    "sign": lambda x, op, v: np.sign(x),
    "square": lambda x, op, v: x * x,
    "floor": lambda x, op, v: np.floor(x),
    "ceil": lambda x, op, v: np.ceil(x),
    "round": lambda x, op, v: np.round(x),
    "sin": lambda x, op, v: np.sin(x),
    "cos": lambda x, op, v: np.cos(x),
    "tan": lambda x, op, v: np.tan(x),
    "asin": lambda x, op, v: np.arcsin(x),
    "acos": lambda x, op, v: np.arccos(x),
    "atan": lambda x, op, v: np.arctan(x),
    "sinh": lambda x, op, v: np.sinh(x),
    "cosh": lambda x, op, v: np.cosh(x),
    "atanh": lambda x, op, v: np.arctanh(x),
    "erf": lambda x, op, v: erf(x),
    "logical_not": lambda x, op, v: np.logical_not(x),
    "identity": lambda x, op, v: x,
    "clip": lambda x, op, v: np.clip(x, _scalar(v["alpha"]), _scalar(v["beta"])),
    "leaky_relu": lambda x, op, v: np.where(x >= 0, x, x * _scalar(v.get("alpha"), 0.01)),
    "elu": lambda x, op, v: np.where(
        x > 0, x, _scalar(v.get("alpha"), 1.0) * np.expm1(np.minimum(x, 0))
    ),
    "softplus": lambda x, op, v: np.logaddexp(0, x),
    "softsign": lambda x, op, v: x / (1 + np.abs(x)),
    "threshold": lambda x, op, v: np.maximum(x, _scalar(v.get("alpha"), 1.0)),
    "linear_activation": lambda x, op, v: (
        _scalar(v.get("alpha"), 1.0) * x + _scalar(v.get("beta"), 0.0)
    ),
    "sigmoid_hard": lambda x, op, v: np.clip(
        _scalar(v.get("alpha"), 0.2) * x + _scalar(v.get("beta"), 0.5), 0, 1
    ),
    "scaled_tanh": lambda x, op, v: (
        _scalar(v.get("alpha"), 1.0) * np.tanh(_scalar(v.get("beta"), 1.0) * x)
    ),
}


def _unary(fn):
    def run(op, v, ctx):
        return fn(_f(v["x"]), op, v)

    return run


for _name, _fn in _UNARY.items():
    kernel(_name)(_unary(_fn))


@kernel("gelu")
def gelu(op, v, ctx):
    x = _f(v["x"])
    mode = v.get("mode", "EXACT")
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    return gelu_exact(x)


@kernel("prelu")
def prelu(op, v, ctx):
    x, alpha = _f(v["x"]), _f(v["alpha"])
    shape = [1] * x.ndim
    shape[1] = -1
    return np.where(x >= 0, x, x * alpha.reshape(shape))


@kernel("select")
def select(op, v, ctx):
    return np.where(_f(v["cond"]), _f(v["a"]), _f(v["b"]))


def _axes(v, ndim):
    axes = v.get("axes")
    if axes is None:
        return None
    return tuple(int(a) % ndim for a in np.atleast_1d(axes))


def _reduce(fn):
    def run(op, v, ctx):
        x = _f(v["x"])
        keep = bool(_scalar(v.get("keep_dims"), False))
        return fn(x, axis=_axes(v, x.ndim), keepdims=keep)

    return run


def _l2(x, axis, keepdims):
    return np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims))


def _log_sum_exp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


for _name, _fn in {
    "reduce_sum": np.sum,
    "reduce_mean": np.mean,
    "reduce_max": np.max,
    "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_l2_norm": _l2,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_log_sum_exp": _log_sum_exp,
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
}.items():
    kernel(_name)(_reduce(_fn))


@kernel("reduce_argmax", "reduce_argmin")
def reduce_arg(op, v, ctx):
    x = _f(v["x"])
    axis = int(_scalar(v.get("axis"), -1))
    fn = np.argmax if op.op_type == "reduce_argmax" else np.argmin
    out = fn(x, axis=axis)
    return np.expand_dims(out, axis) if bool(_scalar(v.get("keep_dims"), False)) else out


@kernel("softmax")
def softmax(op, v, ctx):
    x = _f(v["x"])
    axis = int(_scalar(v.get("axis"), -1))
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _scale_shift(out, v, shape):
    """The optional `gamma` scale and `beta` shift of the normalisations, broadcast by `shape`."""
    if v.get("gamma") is not None:
        out = out * _f(v["gamma"]).reshape(shape)
    if v.get("beta") is not None:
        out = out + _f(v["beta"]).reshape(shape)
    return out


@kernel("layer_norm")
def layer_norm(op, v, ctx):
    x = _f(v["x"])
    axes = _axes(v, x.ndim) or tuple(range(x.ndim))
    eps = _scalar(v.get("epsilon"), 1e-5)
    mean = np.mean(x, axis=axes, keepdims=True)
    var = np.mean(np.square(x - mean), axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + eps)
    shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
    return _scale_shift(out, v, shape)


def _channel_shape(x):
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    return shape


@kernel("batch_norm")
def batch_norm(op, v, ctx):
    x = _f(v["x"])
    shape = _channel_shape(x)
    eps = _scalar(v.get("epsilon"), 1e-5)
    out = (x - _f(v["mean"]).reshape(shape)) / np.sqrt(_f(v["variance"]).reshape(shape) + eps)
    return _scale_shift(out, v, shape)


@kernel("instance_norm")
def instance_norm(op, v, ctx):
    x = _f(v["x"])
    axes = tuple(range(2, x.ndim))
    eps = _scalar(v.get("epsilon"), 1e-5)
    out = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    shape = _channel_shape(x)
    return _scale_shift(out, v, shape)


@kernel("l2_norm")
def l2_norm(op, v, ctx):
    x = _f(v["x"])
    axes = _axes(v, x.ndim) or tuple(range(1, x.ndim))
    eps = _scalar(v.get("epsilon"), 1e-6)
    return x / np.sqrt(np.maximum(np.sum(x * x, axis=axes, keepdims=True), eps))


@kernel("cumsum")
def cumsum(op, v, ctx):
    x = _f(v["x"])
    axis = int(_scalar(v.get("axis"), 0))
    exclusive = bool(_scalar(v.get("exclusive"), False))
    reverse = bool(_scalar(v.get("reverse"), False))
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if exclusive:
        out = out - x
    return np.flip(out, axis) if reverse else out
