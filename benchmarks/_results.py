"""What every benchmark script records beside its numbers, and how it writes them."""

from __future__ import annotations

import json
import platform
from pathlib import Path


def machine() -> dict:
    """The versions and machine a result was measured with."""
    import coremltools as ct
    import numpy as np

    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "coremltools": ct.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        import torch
    except ImportError:
        return info
    return info | {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def write(out: Path, result: dict) -> None:
    """Write `result` (with the machine it ran on) as JSON to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(f"wrote {out}")
