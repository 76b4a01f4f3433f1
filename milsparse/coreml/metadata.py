"""`get_weights_metadata`: coremltools' per-weight metadata, and more.

Like `ct.optimize.coreml.get_weights_metadata`, every `const` of at least `weight_threshold`
elements (whatever reads it, inner consts of a compressed weight included) maps to its values,
sparsity (the share of |w| <= 1e-12), number of distinct values and child ops with their
constant operands; keys and values are coremltools' classes. Beyond coremltools, which lists
plain consts only:

- a compressed weight (a constexpr chain's root) is listed too, under its root's name, with its
  decoded values, its form (`sparse+lut4`, `int8`, ...) and stored bits per weight; a child op's
  `params_name_mapping` names it like any const operand;
- multifunction programs are read (every function; a name in several functions is listed once,
  with the child ops of the first);
- plain consts say `form="dense"` and their dtype's bits; a const inside a compressed weight
  says which op it feeds (`part of fc0_weight`) and the bits it is stored in (1 for a mask).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from attrs import define, field
from coremltools.optimize.coreml._config import _MetaDataDict
from coremltools.optimize.coreml._post_training_quantization import (
    CoreMLOpMetaData,
    CoreMLWeightMetaData,
)

from milsparse import package
from milsparse.ir.chain import Form, bits_of, weight_chain
from milsparse.ir.graph import walk_ops

__all__ = ["WeightMetaData", "get_weights_metadata"]


@define(frozen=True)
class WeightMetaData(CoreMLWeightMetaData):
    """coremltools' `CoreMLWeightMetaData` plus how the weight is stored."""

    form: str = field(default="dense", kw_only=True)
    bits_per_weight: float = field(default=0.0, kw_only=True)

    def __str__(self):
        text = super().__str__()
        return text[:-1] + f"  form: {self.form}\n  bits_per_weight: {self.bits_per_weight:g}\n]"


def get_weights_metadata(mlmodel, weight_threshold: int = 2048) -> dict:
    """{weight name: WeightMetaData} of `mlmodel` (an MLModel or a saved package)."""
    prog = package.load_program(package.open_model(mlmodel))
    found = _MetaDataDict({})
    for func in prog.functions.values():
        for op in walk_ops(func):
            if op.name in found:
                continue
            entry = _entry(op, weight_threshold)
            if entry is not None:
                found[op.name] = entry
    return found


def _listed(var, threshold: int) -> bool:
    """Whether `var` is a weight this listing names: a const of at least `threshold` elements
    (coremltools' rule) or a compressed weight's root of at least as many."""
    op = var.op
    if op is None:
        return False
    if op.op_type == "const":
        return isinstance(var.val, np.ndarray) and var.val.size >= threshold
    chain = weight_chain(op)
    return chain is not None and chain.form is not Form.DENSE and chain.num_elements >= threshold


def _entry(op, threshold: int) -> WeightMetaData | None:
    if op.op_type == "const":
        val = op.outputs[0].val
        if not (isinstance(val, np.ndarray) and val.size >= threshold):
            return None
        bits = bits_of(op.outputs[0])
        inside = [c for c in op.outputs[0].child_ops if c.op_type.startswith("constexpr_")]
        form = f"part of {inside[0].name}" if inside else "dense"
    else:
        chain = weight_chain(op)
        if chain is None or chain.form is Form.DENSE or chain.num_elements < threshold:
            return None
        val = chain.decode().astype(chain.np_dtype)
        bits, form = chain.bits_per_weight, chain.label
    children, seen = [], set()
    for child in op.outputs[-1].child_ops:
        if id(child) in seen:
            continue
        seen.add(id(child))
        mapping = OrderedDict(
            (name, var.op.name)
            for name, var in child.inputs.items()
            if not isinstance(var, (list, tuple)) and _listed(var, threshold)
        )
        children.append(CoreMLOpMetaData(op_type=child.op_type, name=child.name,
                                         params_name_mapping=mapping))  # fmt: skip
    return WeightMetaData(val, child_ops=children, form=form, bits_per_weight=float(bits))
