"""A match is a value: it succeeded with a payload, or failed with a reason for the report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["MatchResult"]


@dataclass(frozen=True)
class MatchResult(Generic[T]):
    """`MatchResult.ok(value)` or `MatchResult.fail("1-D")`; never truthy by accident."""

    value: Any = None
    reason: str | None = None

    @classmethod
    def ok(cls, value: T) -> MatchResult[T]:
        return cls(value=value)

    @classmethod
    def fail(cls, reason: str) -> MatchResult[T]:
        return cls(reason=reason)

    @property
    def matched(self) -> bool:
        return self.reason is None

    def __bool__(self) -> bool:  # pragma: no cover - guard against `if match:` misuse
        raise TypeError("use MatchResult.matched, not truthiness")
