"""The pruning record in a compressed model's metadata: which weights milsparse pruned, to what
spec and along which axis, so `verify` can check the pattern long after the run.

One JSON entry under `PRUNE_METADATA_KEY`; a run on an already compressed model merges its
weights into the entry it found.
"""

from __future__ import annotations

import json

__all__ = ["PRUNE_METADATA_KEY", "declared_pruning", "pruned_metadata"]

PRUNE_METADATA_KEY = "com.github.milsparse.pruned"


def declared_pruning(model) -> dict[str, dict]:
    """{weight: {"spec", "axis"}} that milsparse recorded in `model`'s metadata ({} if none)."""
    meta = model.get_spec().description.metadata.userDefined
    return json.loads(meta[PRUNE_METADATA_KEY]) if PRUNE_METADATA_KEY in meta else {}


def pruned_metadata(source, decisions) -> dict[str, str]:
    """The metadata entry recording each pruned weight of `decisions` (spec and axis), merged
    with the entry `source` already holds; {} when nothing is pruned."""
    pruned = declared_pruning(source)
    for d in decisions:
        if d.compressed:
            pruned[d.name] = {"spec": d.spec, "axis": d.axis}
    return {PRUNE_METADATA_KEY: json.dumps(pruned, sort_keys=True)} if pruned else {}
