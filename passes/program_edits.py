"""Edits of a whole program rather than of one op: its opset, its function order, and which
weight consts its functions store once.

`_rewrite` rewrites single ops; these three change the program around them, on load (function
order) and before export (opset, shared consts).
"""

from __future__ import annotations

import hashlib

import numpy as np
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from milsparse.ir.blobs import release_pages
from milsparse.ir.errors import ConfigError
from milsparse.ir.graph import walk_ops

__all__ = ["order_functions", "retarget", "share_identical_consts"]


def order_functions(prog, description) -> None:
    """Carry a multifunction package's default function over, and fix the function order.

    The loader names no default function (coremltools then looks for `main`) and lists the
    functions in the order of a protobuf map, which may change with PYTHONHASHSEED and would
    reorder the output's weight file. The default comes first, the rest by name.
    """
    if description.functions:
        prog.default_function_name = description.defaultFunctionName or "main"
        prog.export_as_multifunction = True
    default = prog.default_function_name
    order = sorted(prog.functions, key=lambda name: (name != default, name))
    functions = {name: prog.functions[name] for name in order}
    prog.functions.clear()
    prog.functions.update(functions)


def share_identical_consts(prog) -> int:
    """Mark equal weight consts of different functions to be stored once; return how many
    consts share a record with another.

    coremltools' serialiser writes each function's consts on their own unless they carry the
    same `weight_id` (as `save_multifunction` sets them). Equal means same dtype, shape and
    bytes: the same array (shared on load), or equal content (a weight pruned the same way in
    every function). Ids are given in program order, so the output is deterministic.
    """
    if len(prog.functions) < 2:
        return 0
    groups: dict[tuple, list] = {}
    by_identity: dict[int, tuple] = {}
    for func in prog.functions.values():
        for op in walk_ops(func):
            val = op.outputs[0].val if op.op_type == "const" else None
            if not isinstance(val, np.ndarray) or val.size <= 9:
                continue
            key = by_identity.get(id(val))
            if key is None:
                digest = hashlib.blake2b(np.ascontiguousarray(val).view(np.uint8).data)
                key = (str(val.dtype), val.shape, digest.hexdigest())
                by_identity[id(val)] = key
                release_pages(val)  # a mapped weight's pages, read to hash it, leave memory
            groups.setdefault(key, []).append(op)
    shared = 0
    for index, ops in enumerate(g for g in groups.values() if len(g) > 1):
        for op in ops:
            op.weight_id = f"milsparse_shared_{index}"
        shared += len(ops)
    return shared


def below(prog, target: AvailableTarget) -> list[str]:
    """What of `prog` targets less than `target`: `"the model (iOS15)"` or its functions."""
    low = {n: f.opset_version for n, f in prog.functions.items()
           if f.opset_version is not None and f.opset_version < target}  # fmt: skip
    if not low:
        return []
    if len(prog.functions) == 1:
        return [f"the model ({next(iter(low.values())).name})"]
    return [f"function {n!r} ({v.name})" for n, v in low.items()]


def retarget(prog, spec_version: int, target: AvailableTarget | None) -> int:
    """Raise every function's opset to `target`; return the specification version to write.

    Raising is sound: a newer opset keeps every older op. Lowering is refused.
    """
    if target is None:
        return spec_version
    for name, func in prog.functions.items():
        current = func.opset_version
        if current is not None and current > target:
            raise ConfigError(
                f"function {name!r} already targets {current.name}; cannot lower it to "
                f"{target.name}. Drop --target or choose {current.name} or later."
            )
        func.opset_version = target
    return max(spec_version, target.value)
