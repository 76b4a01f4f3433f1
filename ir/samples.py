"""Input samples: the one reader of `.npz` sample files and the one check of sample values
against a function's inputs.

`verify --inputs`, `compress --calibration` and the interpreter take their samples here. A file
is an `.npz` archive (`np.savez(path, x=...)`) whose entries are named after the model's inputs,
each with a leading sample axis (`x` of shape (N, *input shape) holds N samples); an entry of
exactly the input's rank is one sample. The same file serves both commands. Only the inputs'
entries are read, without pickle, and any other entry is an error that names it. A bare `.npy`,
a file that is not a zip, an entry holding Python objects and a file cut short while it is read
are `ConfigError`s naming the file (and entry), never numpy's own messages.

`check_sample` is the rule every sample meets, wherever it came from: exactly the function's
inputs (state inputs may be left out), real numbers of a fitting shape, whole numbers for an
integer input, values the input's dtype can hold, and (for calibration) finite floats.

`value_problem` is the rule for values that cannot be represented in the input's dtype (int64
ids of 2**40 for an int32 input, float64 1e300 for an fp32 one): the interpreter would cast
them silently to wrapped integers or inf.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from milsparse.ir.errors import ConfigError

__all__ = [
    "as_samples",
    "check_input_value",
    "check_sample",
    "fits_input",
    "input_dtype",
    "input_names",
    "is_path",
    "is_state",
    "name_problem",
    "read_npz",
    "read_samples",
    "value_problem",
]

_NPY_MAGIC = b"\x93NUMPY"
_HOW = "write one with np.savez(path, x=...), an array per input name"


def read_npz(
    path, required: Iterable[str], optional: Iterable[str] = (), *, what: str
) -> dict[str, np.ndarray]:
    """The arrays of the `.npz` at `path`: every name in `required`, those of `optional` it
    has. `what` names the data in messages ("inputs", "calibration data")."""
    path = Path(path)
    required, optional = list(required), list(optional)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from e
    if head == _NPY_MAGIC:
        raise ConfigError(f"{path}: a single array (.npy), not a .npz archive ({_HOW})")
    if not zipfile.is_zipfile(path):  # np.load would try it as a pickle, and say so
        raise ConfigError(
            f"{path}: not a .npz archive (a zip of arrays, {_HOW}); is it damaged or truncated?"
        )
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: cannot read {what} (damaged or truncated?): {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ConfigError(f"{path}: not a .npz archive ({_HOW})")
    with data:
        problem = name_problem(data.files, required, optional)
        if problem:
            raise ConfigError(f"{path}: {problem}")
        return {name: _read_entry(data, name, path) for name in data.files}


def _read_entry(data, name: str, path: Path) -> np.ndarray:
    try:
        return data[name]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ConfigError(
                f"{path}: entry {name!r} holds Python objects (an object array); inputs must "
                "be arrays of numbers"
            ) from e
        raise ConfigError(f"{path}: cannot read entry {name!r} (damaged or truncated?): {e}") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(
            f"{path}: cannot read entry {name!r}: the file is damaged or truncated "
            f"({type(e).__name__}{': ' + str(e) if str(e) else ''})"
        ) from e


def name_problem(given: Iterable[str], required: Iterable[str], optional: Iterable[str] = ()):
    """What is wrong with the names of a sample (missing inputs, names that are not inputs),
    or None."""
    given, required, optional = set(given), list(required), list(optional)
    missing = sorted(set(required) - given)
    extra = sorted(given - set(required) - set(optional))
    if not (missing or extra):
        return None
    parts = []
    if missing:
        parts.append(f"missing input {missing[0]!r}" if len(missing) == 1 else f"missing {missing}")
    if extra:
        parts.append(f"not inputs of the model: {extra}")
    return f"{'; '.join(parts)}; the model takes {sorted([*required, *optional])}"


def _dtype_name(dtype: np.dtype) -> str:
    return f"fp{dtype.itemsize * 8}" if dtype.kind == "f" else dtype.name


def value_problem(value, dtype) -> str | None:
    """Why `value` cannot be represented in `dtype` (its finite values overflow a float dtype,
    or fall outside an integer one), or None. Precision lost in a cast is no problem, nor are
    non-finite floats (their own checks judge them)."""
    value, dtype = np.asarray(value), np.dtype(dtype)
    if value.size == 0 or value.dtype.kind not in "iuf" or dtype.kind not in "iuf":
        return None
    if dtype.kind == "f":
        if value.dtype.kind == "f" and value.dtype.itemsize <= dtype.itemsize:
            return None
        with np.errstate(over="ignore"):  # the overflow is what is looked for
            cast = value.astype(dtype)
        bad = np.isinf(cast) & np.isfinite(value)
        limit = f"+-{float(np.finfo(dtype).max):g}"
    else:
        info = np.iinfo(dtype)
        if value.dtype.kind == "f":
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(value) | (value < info.min) | (value > info.max)
        elif int(value.min()) >= info.min and int(value.max()) <= info.max:
            return None
        else:  # compared as Python ints: uint64 and int64 do not mix in numpy
            bad = np.array([not info.min <= int(v) <= info.max for v in value.ravel()])
        limit = f"{info.min} to {info.max}"
    if not bad.any():
        return None
    example = value.ravel()[int(np.flatnonzero(bad.ravel())[0])]
    shown = f"{float(example):g}" if value.dtype.kind == "f" else str(int(example))
    name = _dtype_name(dtype)
    return f"holds {shown}, outside the range of {name} ({limit}), the input's dtype"


def input_dtype(var) -> np.dtype | None:
    """The numpy dtype of a function input (a state's wrapped tensor too), or None."""
    from coremltools.converters.mil.mil import types

    sym = var.sym_type
    if types.is_state(sym):
        sym = sym.wrapped_type()
    primitive = sym.get_primitive() if types.is_tensor(sym) else sym
    try:
        return np.dtype(types.nptype_from_builtin(primitive))
    except Exception:  # strings, lists: no numeric dtype to check against
        return None


def check_input_value(name: str, value, var, where: str = "") -> None:
    """ConfigError when `value` for input `name` (`var`) cannot be represented in its dtype;
    `where` ("calibration sample 2") starts the message."""
    dtype = input_dtype(var)
    problem = value_problem(value, dtype) if dtype is not None else None
    if problem:
        raise ConfigError(f"{where + ': ' if where else ''}input {name!r} {problem}")


def is_path(value) -> bool:
    """Whether `value` names a file (a str, bytes or path-like), rather than holding samples."""
    return isinstance(value, (str, bytes)) or hasattr(value, "__fspath__")


def is_state(var) -> bool:
    """Whether function input `var` is a state (an iOS18 stateful model's KV cache, say)."""
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def fits_input(value: np.ndarray, var) -> bool:
    """Whether `value`'s shape fits the function input `var`: its shape, when every dim is
    fixed; its rank, when some are symbolic."""
    expected = tuple(var.shape)
    fixed = all(isinstance(d, int) for d in expected)
    return value.ndim == len(expected) and (not fixed or value.shape == expected)


def input_names(func) -> tuple[list[str], list[str]]:
    """(inputs a sample must give, state inputs it may give: they start at zeros otherwise)."""
    states = [name for name, var in func.inputs.items() if is_state(var)]
    return [name for name in func.inputs if name not in states], states


def read_samples(path, func, *, what: str) -> list[dict[str, np.ndarray]]:
    """The samples of the `.npz` at `path` for `func`: each entry holds N samples on a leading
    axis, or one sample when it has exactly the input's rank. Every entry must agree."""
    required, states = input_names(func)
    arrays = read_npz(path, required, states, what=what)
    counts = {}
    for name, value in arrays.items():
        var = func.inputs[name]
        if value.ndim == len(var.shape) + 1 and (value.shape[0] == 0 or fits_input(value[0], var)):
            counts[name] = value.shape[0]
        elif fits_input(value, var):
            counts[name] = None  # one sample
        else:
            expected = tuple(var.shape)
            raise ConfigError(
                f"{path}: entry {name!r} has shape {value.shape}; the input is {expected}, so "
                f"an entry holds N samples as (N, {', '.join(map(str, expected))}), or one "
                f"sample as {expected}"
            )
    if len(set(counts.values())) > 1:
        told = ", ".join(
            f"{n}: {'1 (no sample axis)' if c is None else c}" for n, c in counts.items()
        )
        raise ConfigError(f"{path}: the entries hold different numbers of samples ({told})")
    count = next(iter(counts.values()), None)
    if count is None:
        return [arrays]
    if count == 0:
        raise ConfigError(f"{path}: the entries hold no samples (a leading axis of size 0)")
    return [{name: value[i] for name, value in arrays.items()} for i in range(count)]


def as_samples(value, func, *, what: str) -> list[dict]:
    """Samples from an `.npz` path (`read_samples`), one {input name: array} dict, or a
    non-empty list of such dicts; unchecked (see `check_sample`)."""
    if is_path(value):
        return read_samples(os.fsdecode(value), func, what=what)
    if isinstance(value, Mapping):
        return [dict(value)]
    if isinstance(value, Sequence) and all(isinstance(s, Mapping) for s in value):
        if not value:
            raise ConfigError(f"{what} is an empty list; give at least one sample")
        return [dict(s) for s in value]
    raise ConfigError(
        f"{what} must be a dict of arrays (input name -> array), a list of such dicts, or an "
        ".npz path"
    )


def check_sample(func, sample: Mapping, where: str, *, finite: bool = False) -> dict:
    """`sample` as {input name: array}, once it names exactly `func`'s inputs (state inputs may
    be left out) and each value is real numbers that fit its input: shape, whole numbers for an
    integer input, within the dtype's range, and finite if `finite`. ConfigError otherwise,
    starting with `where` ("calibration sample 2")."""
    required, states = input_names(func)
    problem = name_problem(sample, required, states)
    if problem:
        raise ConfigError(f"{where}: {problem}")
    arrays = {}
    for name, value in sample.items():
        var = func.inputs[name]
        value = np.asarray(value)
        kind = value.dtype.kind
        if kind not in "biuf":
            what = {"c": "complex", "U": "string", "S": "bytes", "O": "object"}.get(kind, kind)
            raise ConfigError(f"{where}: {name!r} is a {what} array; inputs must be real numbers")
        if is_state(var):
            expected = tuple(var.sym_type.wrapped_type().get_shape())
            fits = value.shape == expected
        else:
            expected, fits = tuple(var.shape), fits_input(value, var)
        if not fits:
            raise ConfigError(
                f"{where}: input {name!r} has shape {value.shape}; the model expects {expected}"
            )
        dtype = input_dtype(var)
        if kind == "f" and dtype is not None and dtype.kind in "iub":
            with np.errstate(invalid="ignore"):
                fractional = np.isfinite(value) & (value != np.round(value))
            if fractional.any():
                example = float(value.ravel()[int(np.flatnonzero(fractional.ravel())[0])])
                raise ConfigError(
                    f"{where}: input {name!r} holds {example:g}; the input is {dtype.name} and "
                    "takes whole numbers"
                )
        if finite and kind == "f" and not np.all(np.isfinite(value)):
            raise ConfigError(f"{where}: input {name!r} is not finite (inf or nan)")
        check_input_value(name, value, var, where)
        arrays[name] = value
    return arrays
