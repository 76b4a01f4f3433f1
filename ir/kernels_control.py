"""Control-flow kernels: `while_loop` and `cond` run their nested blocks through the context."""

from __future__ import annotations

import numpy as np
from milsparse.ir.interpreter import kernel


@kernel("while_loop")
def while_loop(op, v, ctx):
    cond_block, body_block = op.blocks
    values = list(v["loop_vars"])
    # Core ML caps nothing here; a program that never exits would not convert from torch.
    while bool(np.asarray(ctx.run(cond_block, values)[0])):
        values = ctx.run(body_block, values)
    return tuple(values) if len(values) > 1 else values[0]


@kernel("cond")
def cond(op, v, ctx):
    true_block, false_block = op.blocks
    chosen = true_block if bool(np.asarray(v["pred"])) else false_block
    out = ctx.run(chosen, [])
    return tuple(out) if len(out) > 1 else out[0]
