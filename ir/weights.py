"""A read-only table of a program's weights: form, sparsity and bytes of each.

A weight is a `const` of 10 or more float elements read by a non-constexpr op, or the root of a
chain of constexpr ops (e.g. `constexpr_lut_to_sparse -> constexpr_sparse_to_dense`); each row
is read from its `milsparse.ir.chain.WeightChain`. Its stored bytes are the weight-file bytes of
every tensor the chain stores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from milsparse.ir.chain import Form, WeightChain, weight_chain
from milsparse.ir.graph import uses_of, walk_ops

__all__ = ["WeightRow", "weight_table"]


@dataclass(frozen=True)
class WeightRow:
    name: str
    consumers: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    format: str  # the chain's label: dense, sparse, lut4, int8, sparse+lut4, ...
    sparsity: float
    dense_bytes: int
    stored_bytes: int
    function: str | None = None  # set for multifunction programs
    shared_with: str | None = None  # another function stores this weight (counted there)
    form: str = "dense"  # the chain's Form value: dense, sparse, palettized, ...
    read_by: tuple[str, ...] = ()  # multifunction: every function that reads this weight

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.stored_bytes / self.num_elements if self.num_elements else 0.0

    @property
    def sparse(self) -> bool:
        return Form(self.form).sparse

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["consumers"] = list(self.consumers)
        row["shape"] = list(self.shape)
        row["read_by"] = list(self.read_by)
        row["bits_per_weight"] = self.bits_per_weight
        return row


def weight_table(prog, functions=None) -> list[WeightRow]:
    """One row per weight of every function of `prog` (or of the named `functions`), in
    program order."""
    rows, keys = [], []
    multifunction = len(prog.functions) > 1
    stored_by: dict[tuple, str] = {}  # the arrays a weight is stored in -> first function
    readers: dict[tuple, list[str]] = {}  # -> every function that reads them
    for name, func in prog.functions.items():
        if functions is not None and name not in functions:
            continue
        for op in walk_ops(func):
            chain = weight_chain(op)
            if chain is None:
                continue
            row = _row(chain)
            if multifunction:
                # the loader gives functions that share a weight-file record the same array
                key = tuple(id(v.val) for v in _stored_vars(chain))
                first = stored_by.setdefault(key, name)
                row = replace(row, function=name, shared_with=None if first == name else first)
                keys.append(key)
                if name not in readers.setdefault(key, []):
                    readers[key].append(name)
            rows.append(row)
    if multifunction:
        rows = [replace(row, read_by=tuple(readers[k])) for row, k in zip(rows, keys, strict=True)]
    return rows


def _row(chain: WeightChain) -> WeightRow:
    uses = uses_of(chain.var)
    return WeightRow(
        name=chain.name,
        consumers=tuple(f"{u.op.name}.{u.input_name}" for u in uses),
        shape=chain.shape,
        dtype=chain.dtype,
        format=chain.label,
        sparsity=float("nan") if chain.sparsity is None else chain.sparsity,
        dense_bytes=chain.dense_bytes,
        stored_bytes=chain.stored_bytes,
        form=chain.form.value,
    )


def _stored_vars(chain: WeightChain) -> list:
    if not chain.ops:
        return [chain.op.outputs[0]]
    return [
        var
        for op in chain.ops
        for var in op.inputs.values()
        if var.op is not None and var.op.op_type == "const"
    ]
