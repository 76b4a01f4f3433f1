"""What a compression pass decided for each weight: the rows of the compress report."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["WeightDecision"]


@dataclass(frozen=True)
class WeightDecision:
    """One weight the pass looked at.

    `compressed` says whether it was rewritten; when not, `reason` says why ("1-D", "small: ...",
    "sparse form would be larger: ...", ...). Sparsity is the fraction of zeros in the weight as
    it leaves the pass; bytes follow `milsparse.ir.formats`' accounting.
    """

    name: str
    consumers: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    compressed: bool
    reason: str | None = None
    spec: str | None = None
    axis: int | None = None
    sparsity: float = 0.0
    dense_bytes: int = 0
    stored_bytes: int = 0
    note: str | None = None
    function: str | None = None  # set for multifunction programs
    shared_with: str | None = None  # the function whose row counts this shared weight's bytes

    @property
    def bytes_saved(self) -> int:
        return self.dense_bytes - self.stored_bytes

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["consumers"] = list(self.consumers)
        row["shape"] = list(self.shape)
        return row
