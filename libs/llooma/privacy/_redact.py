"""Run the detectors, resolve overlaps and replace what is left by placeholders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from llooma.privacy import _detectors as d
from llooma.privacy._mapping import Mapping
from llooma.privacy._names import find_names

NerHook = Callable[[str], Sequence[tuple[int, int]]]


class Entity(NamedTuple):
    """One replaced span of the original text (positions only, never the value)."""

    start: int
    end: int
    kind: str
    placeholder: str


@dataclass(frozen=True)
class Redaction:
    """The redacted text, the mapping that restores it and where the replacements were made."""

    text: str
    mapping: Mapping
    entities: tuple[Entity, ...]


def _resolve(found: list[d.Found]) -> list[d.Found]:
    """Non-overlapping spans: the higher priority wins, then the longer one, then the first."""
    chosen: list[d.Found] = []
    for f in sorted(found, key=lambda f: (-f.priority, -(f.end - f.start), f.start)):
        if f.end > f.start and all(f.end <= c.start or f.start >= c.end for c in chosen):
            chosen.append(f)
    return sorted(chosen, key=lambda f: f.start)


def detect(
    text: str, *, strict: bool = False, ner: NerHook | None = None, known_names: Sequence[str] = ()
) -> list[d.Found]:
    """All non-overlapping spans to redact in `text`, in order."""
    found: list[d.Found] = []
    digit = d.has_digit(text)
    for detector in (*d.DETECTORS, *d.STRICT_DETECTORS) if strict else d.DETECTORS:
        if detector.may_find(text, digit):
            found += detector.find(text)
    name_spans = find_names(text, known_names)
    if ner is not None:
        name_spans = [*name_spans, *ner(text)]
    found += [d.Found(s, e, "NAME", d.PRIORITY["NAME"]) for s, e in name_spans]
    return _resolve(found)


def redact(
    text: str,
    *,
    strict: bool = False,
    mapping: Mapping | None = None,
    ner: NerHook | None = None,
) -> Redaction:
    """Replace identifiers by placeholders; no NER model is used (`ner` can plug one in)."""
    # Detection is deterministic: patterns, checksums, libphonenumber and Faker's name lists,
    # as no model can be downloaded here. `ner` returns extra (start, end) name spans. One
    # `mapping` shared by every message of a conversation keeps its placeholders consistent.
    mapping = Mapping() if mapping is None else mapping
    mapping.reserve(text)
    spans = detect(text, strict=strict, ner=ner, known_names=mapping.values_of("NAME"))
    parts: list[str] = []
    entities: list[Entity] = []
    pos = 0
    for f in spans:
        placeholder = mapping.placeholder(f.kind, text[f.start : f.end])
        parts += [text[pos : f.start], placeholder]
        entities.append(Entity(f.start, f.end, f.kind, placeholder))
        pos = f.end
    parts.append(text[pos:])
    return Redaction("".join(parts), mapping, tuple(entities))
