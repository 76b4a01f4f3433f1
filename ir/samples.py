"""Input samples: the one reader of `.npz` sample files and the checks of sample values against
a function's inputs.

`verify --inputs` and `compress --calibration` read their files here. A file is an `.npz`
archive (`np.savez(path, x=...)`) whose entries are named after the model's inputs; only those
entries are read, without pickle, and any other entry is an error that names it. A bare `.npy`,
a file that is not a zip, an entry holding Python objects and a file cut short while it is read
are `ConfigError`s naming the file (and entry), never numpy's own messages.

`value_problem` is the rule for values that cannot be represented in the input's dtype (int64
ids of 2**40 for an int32 input, float64 1e300 for an fp32 one): the interpreter would cast
them silently to wrapped integers or inf.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from milsparse.ir.errors import ConfigError

__all__ = ["read_npz", "name_problem", "value_problem", "input_dtype", "check_input_value"]

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
