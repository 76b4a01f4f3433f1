"""Compressed weights back to plain consts: every constexpr chain of every function (nested
blocks included) replaced by a `const` of the dense weight it decodes to, bit for bit what
coremltools' own `materialized_val_inference` gives, in the weight's own dtype. The chain's
inner ops go with it; the const keeps the root's name, so consumers read the same name.
"""

from __future__ import annotations

from milsparse.ir.chain import Form, weight_chain
from milsparse.ir.graph import walk_ops
from milsparse.passes._rewrite import replace_op

__all__ = ["decompress_weights"]


def decompress_weights(prog, spill=None) -> list[str]:
    """Decompress every compressed weight of `prog` in place, the dense values into `spill`
    (an `ir.blobs.Spill`, or None to keep them in memory); return the weights' names."""
    done = []
    for func in prog.functions.values():
        roots = []
        for op in walk_ops(func):
            chain = weight_chain(op)
            if chain is not None and chain.form is not Form.DENSE:
                roots.append(chain)
        for chain in roots:
            dense = chain.decode().astype(chain.np_dtype)
            inner = [o for o in chain.ops if o is not chain.op]

            def build(site, tmp_name, dense=dense):
                return site.const(dense, tmp_name)

            replace_op(chain.op, build, spill)
            _remove_unread(inner[::-1])
            done.append(chain.op.name)
    return done


def _remove_unread(ops) -> None:
    """Remove the chain's inner constexpr ops (readers before what they read) that nothing
    reads any more, and then the consts only they read."""
    for op in ops:
        if any(var.child_ops for var in op.outputs):
            continue
        inputs = [v.op for v in op.inputs.values() if v.op is not None]
        op.enclosing_block.remove_ops([op])
        for const in inputs:
            if const.op_type == "const" and not const.outputs[0].child_ops:
                const.enclosing_block.remove_ops([const])
