"""Placeholder <-> original value table for one request or conversation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from collections.abc import Mapping as AbcMapping

KINDS = (
    "EMAIL",
    "PHONE",
    "CARD",
    "IBAN",
    "NATIONAL_ID",
    "IP",
    "URL",
    "SECRET",
    "ADDRESS",
    "DOB",
    "NAME",
)
STRICT_KINDS = ("AGE", "POSTCODE", "EMPLOYER")
ALL_KINDS = KINDS + STRICT_KINDS

PLACEHOLDER = re.compile(r"\[([A-Z]+(?:_[A-Z]+)*)_([1-9][0-9]*)\]")

_COMPACT_KINDS = frozenset({"PHONE", "CARD", "IBAN", "NATIONAL_ID"})
_CASELESS_KINDS = frozenset({"EMAIL", "NAME", "ADDRESS", "EMPLOYER", "POSTCODE", "IP", "DOB"})


def _key(kind: str, value: str) -> str:
    if kind in _COMPACT_KINDS:
        return "".join(c for c in value if c.isalnum() or c == "+").upper()
    if kind in _CASELESS_KINDS:
        return " ".join(value.split()).casefold()
    return value


class Mapping(AbcMapping[str, str]):
    """Placeholder -> original, with a reverse index; `repr` shows placeholder names only."""

    __slots__ = ("_counters", "_originals", "_placeholders")

    def __init__(self) -> None:
        self._originals: dict[str, str] = {}
        self._placeholders: dict[tuple[str, str], str] = {}
        self._counters: dict[str, int] = {}

    @classmethod
    def from_dict(cls, originals: AbcMapping[str, str]) -> Mapping:
        """Rebuild a mapping (with its reverse index) from `dict(mapping)`."""
        mapping = cls()
        for placeholder, value in originals.items():
            m = PLACEHOLDER.fullmatch(placeholder)
            if m is None:
                raise ValueError("not a placeholder")
            kind, number = m.group(1), int(m.group(2))
            mapping._originals[placeholder] = value
            mapping._placeholders.setdefault((kind, _key(kind, value)), placeholder)
            mapping._counters[kind] = max(mapping._counters.get(kind, 0), number)
        return mapping

    def placeholder(self, kind: str, value: str) -> str:
        """The placeholder of `value`, allocating `[KIND_n]` the first time it is seen."""
        key = (kind, _key(kind, value))
        existing = self._placeholders.get(key)
        if existing is not None:
            return existing
        number = self._counters.get(kind, 0) + 1
        self._counters[kind] = number
        placeholder = f"[{kind}_{number}]"
        self._placeholders[key] = placeholder
        self._originals[placeholder] = value
        return placeholder

    def reserve(self, text: str) -> None:
        """Keep placeholder-like text the user typed as it is: its number is skipped, and it
        maps to itself, so `restore` gives it back rather than a neutral word."""
        for m in PLACEHOLDER.finditer(text):
            if m.group() not in self._originals:
                kind, number = m.group(1), int(m.group(2))
                self._counters[kind] = max(self._counters.get(kind, 0), number)
                self._originals[m.group()] = m.group()

    def values_of(self, kind: str) -> list[str]:
        """Original values of one kind (used to find later mentions of known names)."""
        prefix = f"[{kind}_"
        return [v for p, v in self._originals.items() if p.startswith(prefix) and v != p]

    def __getitem__(self, placeholder: str) -> str:
        return self._originals[placeholder]

    def __iter__(self) -> Iterator[str]:
        return iter(self._originals)

    def __len__(self) -> int:
        return len(self._originals)

    def __repr__(self) -> str:
        # Only names: a mapping that reaches a log line must not leak what it hides.
        return f"Mapping({len(self)} placeholders: {', '.join(self._originals) or '-'})"

    __str__ = __repr__
