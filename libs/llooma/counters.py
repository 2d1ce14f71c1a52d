"""Process-wide counts of what a service refused or threw away (bad heartbeats, poison
messages), carried in every ServiceHeartbeat so an operator or a test can read them."""

from __future__ import annotations

from collections import Counter

_COUNTS: Counter[str] = Counter()


def count(name: str, amount: int = 1) -> None:
    _COUNTS[name] += amount


def snapshot() -> dict[str, int]:
    return dict(_COUNTS)
