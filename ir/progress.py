"""Progress bars: one rule for when they show, and the bars of the long steps.

`show=None` (every default) shows a bar only when stderr is a terminal, tqdm's own rule, so a
library call in a script, a notebook or a CI log prints nothing on stderr; `show=True` always
shows it (`ms.compress(..., progress=True)` in a notebook), `show=False` never.
"""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["bar", "disable"]


def disable(show: bool | None) -> bool | None:
    """tqdm's `disable` for `show` (None: off unless stderr is a terminal)."""
    return None if show is None else not show


def bar(desc: str, *, total: int | None = None, unit: str = "it", show: bool | None = None,
        in_bytes: bool = False) -> tqdm:  # fmt: skip
    """A bar that is cleared when it closes (`leave=False`); `in_bytes` counts bytes (KB, MB)."""
    scale = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if in_bytes else {"unit": unit}
    return tqdm(desc=desc, total=total, leave=False, disable=disable(show), **scale)
