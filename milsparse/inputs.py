"""Inputs generated from a model's input description, for `verify` when none are given.

Floats: standard normal. Images: uniform over [0, 255]. Integers: the table size of the gathers
they index (token ids), {0, 1} otherwise (masks and flags). Deterministic for a seed.
"""

from __future__ import annotations

import numpy as np

from milsparse.errors import UnsupportedModelError
from milsparse.options import check_count

__all__ = ["generate_inputs", "default_function", "integer_input_range"]

_ARRAY_DTYPES = {  # coremltools.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
    65568: np.float32,  # FLOAT32
    65552: np.float16,  # FLOAT16
    65600: np.float64,  # DOUBLE
    131104: np.int32,  # INT32
    131080: np.int8,  # INT8
}


def _default_shape(array_type) -> list[int]:
    shape = [int(d) for d in array_type.shape]
    which = array_type.WhichOneof("ShapeFlexibility")
    if which == "enumeratedShapes" and not shape:
        shape = [int(d) for d in array_type.enumeratedShapes.shapes[0].shape]
    elif which == "shapeRange" and not shape:
        shape = [int(r.lowerBound) for r in array_type.shapeRange.sizeRanges]
    return shape


# Ops an index goes through unchanged on its way to a gather: casts, shape changes, and the
# negative-index wrap (`select(x >= 0, x, x + size)`) that converters emit. Arithmetic that
# scales an index (mul, ...) is not followed.
_INDEX_PASSTHROUGH = frozenset(
    {
        "cast", "reshape", "squeeze", "expand_dims", "transpose", "identity", "slice_by_index",
        "slice_by_size", "tile", "concat", "select", "add", "sub", "greater_equal", "less",
    }
)  # fmt: skip


def _gather_bound(func, name: str) -> int | None:
    """Smallest table size among the gathers that integer input `name` indexes (through
    `_INDEX_PASSTHROUGH` ops), or None if it indexes no gather."""
    start = func.inputs.get(name)
    if start is None:
        return None
    bound, frontier, seen = None, [start], set()
    while frontier:
        var = frontier.pop()
        if id(var) in seen:
            continue
        seen.add(id(var))
        for op in var.child_ops:
            if op.op_type in ("gather", "gather_along_axis") and op.inputs.get("indices") is var:
                axis = int(op.axis.val) if op.axis is not None else 0
                size = op.x.shape[axis]
                if isinstance(size, int):
                    bound = size if bound is None else min(bound, size)
            elif op.op_type in _INDEX_PASSTHROUGH:
                frontier.extend(op.outputs)
    return bound


def integer_input_range(func, name: str, dtype) -> tuple[int, int]:
    """[low, high) of generated values for integer input `name`.

    An input that indexes a gather (an embedding's token ids) spans the smallest table it
    indexes. Any other integer input is taken for a mask or flag used in arithmetic (an
    attention mask turned into `(1 - mask) * -10000`) and gets {0, 1}: wider values would
    overflow such arithmetic in fp16, or mean nothing to the model.
    """
    bound = _gather_bound(func, name)
    high = 2 if bound is None else bound
    return 0, min(high, int(np.iinfo(dtype).max) + 1)


def _input_descriptions(mlmodel, function: str):
    """The input descriptions of `function` (a multifunction model keeps them per function)."""
    description = mlmodel.get_spec().description
    for fdesc in description.functions:
        if fdesc.name == function:
            return list(fdesc.input)
    return list(description.input)


def default_function(mlmodel, prog) -> str:
    """The function verify runs: the model's default function (`main` for single-function
    models, `defaultFunctionName` for multifunction ones)."""
    default = mlmodel.get_spec().description.defaultFunctionName if mlmodel is not None else ""
    if default and default in prog.functions:
        return default
    if "main" in prog.functions:
        return "main"
    return next(iter(prog.functions))


def generate_inputs(
    mlmodel, prog, samples: int = 4, seed: int = 0, function: str | None = None
) -> list[dict[str, np.ndarray]]:
    """Random inputs from the model's input description, deterministic for a seed.

    Floats: standard normal. Images: uniform over [0, 255]. Integers: see
    `integer_input_range` (a gather's table for indices, {0, 1} otherwise). Flexible shapes
    use their declared default.
    """
    check_count("samples", samples, low=1)
    check_count("seed", seed, low=0)
    function = function or default_function(mlmodel, prog)
    func = prog.functions[function]
    rng = np.random.default_rng(seed)
    feeds = []
    descriptions = _input_descriptions(mlmodel, function)
    for _ in range(samples):
        feed = {}
        for spec_input in descriptions:
            kind = spec_input.type.WhichOneof("Type")
            if kind == "imageType":
                image = spec_input.type.imageType
                channels = 1 if image.colorSpace == 10 else 3
                feed[spec_input.name] = rng.uniform(
                    0, 255, (1, channels, image.height, image.width)
                ).astype(np.float32)
                continue
            if kind != "multiArrayType":
                raise UnsupportedModelError(
                    f"input {spec_input.name!r} is a {kind}; pass inputs to verify explicitly"
                )
            array = spec_input.type.multiArrayType
            shape = _default_shape(array)
            dtype = _ARRAY_DTYPES.get(array.dataType)
            if dtype is None:
                raise UnsupportedModelError(
                    f"input {spec_input.name!r} has array data type {array.dataType}; "
                    "pass inputs to verify explicitly"
                )
            if np.issubdtype(dtype, np.integer):
                low, high = integer_input_range(func, spec_input.name, dtype)
                feed[spec_input.name] = rng.integers(low, high, shape).astype(dtype)
            else:
                feed[spec_input.name] = rng.standard_normal(shape).astype(dtype)
        feeds.append(feed)
    return feeds
