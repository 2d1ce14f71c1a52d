"""Put the originals back into a host's answer, whole or as a stream of chunks."""

from __future__ import annotations

import re
from collections.abc import Mapping as AbcMapping

from llooma.privacy._mapping import ALL_KINDS, PLACEHOLDER

# A placeholder the model made up ("[EMAIL_2]" when the mapping holds only "[EMAIL_1]") has no
# original: it becomes a neutral word, never placeholder syntax, so the client reads a sentence
# rather than a template slot. Dropping it would leave "Write to  today" or silently change what
# the sentence says; a neutral word keeps the sentence whole and claims nothing.
NEUTRAL = {
    "EMAIL": "the email address",
    "PHONE": "the phone number",
    "CARD": "the card number",
    "IBAN": "the account number",
    "NATIONAL_ID": "the ID number",
    "IP": "the IP address",
    "URL": "the link",
    "SECRET": "the secret",
    "ADDRESS": "the address",
    "DOB": "the date of birth",
    "NAME": "someone",
    "AGE": "the age",
    "POSTCODE": "the postcode",
    "EMPLOYER": "the employer",
}
assert set(NEUTRAL) == set(ALL_KINDS)

_SKIPPED = " \t\"'\u201c\u2018(*"
_SENTENCE_END = ".!?\n:"
# What may still grow into a placeholder of one of our kinds: "[", "[EM", "[EMAIL_", "[EMAIL_1".
_KIND_PREFIXES = frozenset(f"[{kind}_"[:i] for kind in ALL_KINDS for i in range(1, len(kind) + 3))
_NUMBERED_PREFIX = re.compile(
    r"\[(?:" + "|".join(sorted(ALL_KINDS, key=len, reverse=True)) + r")_[1-9][0-9]{0,5}"
)
_LONGEST_PARTIAL = max(len(p) for p in _KIND_PREFIXES) + 6


def _significant(text: str) -> str:
    """The last character of `text` that says whether a sentence ended, or ""."""
    stripped = text.rstrip(_SKIPPED)
    return stripped[-1] if stripped else ""


def _render(text: str, mapping: AbcMapping[str, str], before: str) -> str:
    """`text` restored; `before` is the last significant character of the text ahead of it."""

    def one(m: re.Match[str]) -> str:
        original = mapping.get(m.group())
        if original is not None:
            return original
        neutral = NEUTRAL.get(m.group(1))
        if neutral is None:
            return m.group()  # "[TODO_1]": not ours, the model's text as is
        last = _significant(text[: m.start()]) or before
        return neutral[0].upper() + neutral[1:] if last in ("", *_SENTENCE_END) else neutral

    return PLACEHOLDER.sub(one, text)


def restore(text: str, mapping: AbcMapping[str, str]) -> str:
    """Replace every known placeholder with its original and every invented one of our kinds
    with a neutral word (`NEUTRAL`); other bracketed text stays."""
    if "[" not in text:
        return text
    return _render(text, mapping, "")


class StreamRestorer:
    """Restore a streamed answer chunk by chunk, holding back a trailing partial placeholder."""

    # The emitted text equals `restore` of the whole answer for any chunking: a cut is only
    # ever made just before a "[", no placeholder has a "[" inside it, and the one character
    # of context a neutral word looks at (did a sentence end?) is carried across chunks.

    def __init__(self, mapping: AbcMapping[str, str]) -> None:
        self._mapping = mapping
        self._pending = ""
        self._before = ""
        self._size = -1
        self._prefixes: frozenset[str] = frozenset()

    def _partials(self) -> frozenset[str]:
        # The mapping may still grow between chunks (a shared conversation mapping).
        if len(self._mapping) != self._size:
            self._size = len(self._mapping)
            self._prefixes = frozenset(p[:i] for p in self._mapping for i in range(1, len(p)))
        return self._prefixes

    def _may_grow(self, tail: str) -> bool:
        return (
            tail in _KIND_PREFIXES
            or _NUMBERED_PREFIX.fullmatch(tail) is not None
            or tail in self._partials()
        )

    @property
    def held(self) -> str:
        """Text held back, waiting for the rest of a placeholder."""
        return self._pending

    @property
    def max_hold(self) -> int:
        """The most characters ever held back: a placeholder with six digits, but its "]"."""
        return max(_LONGEST_PARTIAL, *(len(p) - 1 for p in self._mapping))

    def _emit(self, text: str) -> str:
        out = _render(text, self._mapping, self._before) if "[" in text else text
        self._before = _significant(text) or self._before
        return out

    def feed(self, chunk: str) -> str:
        """Text of `chunk` (and what was held) that is safe to emit now."""
        text = self._pending + chunk
        cut = text.rfind("[")
        if cut >= 0 and self._may_grow(text[cut:]):
            self._pending = text[cut:]
            return self._emit(text[:cut])
        self._pending = ""
        return self._emit(text)

    def flush(self) -> str:
        """Whatever is still held: it never completed a placeholder."""
        text, self._pending = self._pending, ""
        return self._emit(text)
