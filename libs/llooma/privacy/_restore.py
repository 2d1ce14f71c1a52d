"""Put the originals back into a host's answer, whole or as a stream of chunks."""

from __future__ import annotations

from collections.abc import Mapping as AbcMapping

from llooma.privacy._mapping import PLACEHOLDER


def restore(text: str, mapping: AbcMapping[str, str]) -> str:
    """Replace every known placeholder with its original; unknown bracketed text stays."""
    if "[" not in text or not mapping:
        return text
    return PLACEHOLDER.sub(lambda m: mapping.get(m.group(), m.group()), text)


class StreamRestorer:
    """Restore a streamed answer chunk by chunk, holding back a trailing partial placeholder."""

    # The emitted text equals `restore` of the whole answer for any chunking: a cut is only
    # ever made just before a "[", and no placeholder has a "[" inside it.

    def __init__(self, mapping: AbcMapping[str, str]) -> None:
        self._mapping = mapping
        self._pending = ""
        self._size = -1
        self._prefixes: frozenset[str] = frozenset()

    def _partials(self) -> frozenset[str]:
        # The mapping may still grow between chunks (a shared conversation mapping).
        if len(self._mapping) != self._size:
            self._size = len(self._mapping)
            self._prefixes = frozenset(p[:i] for p in self._mapping for i in range(1, len(p)))
        return self._prefixes

    @property
    def held(self) -> str:
        """Text held back, waiting for the rest of a placeholder."""
        return self._pending

    @property
    def max_hold(self) -> int:
        """The most characters ever held back: one less than the longest placeholder."""
        return max((len(p) - 1 for p in self._mapping), default=0)

    def feed(self, chunk: str) -> str:
        """Text of `chunk` (and what was held) that is safe to emit now."""
        text = self._pending + chunk
        cut = text.rfind("[")
        if cut >= 0 and text[cut:] in self._partials():
            self._pending = text[cut:]
            return restore(text[:cut], self._mapping)
        self._pending = ""
        return restore(text, self._mapping)

    def flush(self) -> str:
        """Whatever is still held: it never completed a placeholder."""
        text, self._pending = self._pending, ""
        return restore(text, self._mapping)
