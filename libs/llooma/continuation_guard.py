"""What a continuing host must never pass to the client (issue 14, item 6): an echo of the
continuation frame (its markers, whole or mangled, and its sentences, wherever they appear) or a
re-emission of the answer so far; and, where the engine can continue an assistant message, the
prefill that needs no frame at all."""

from __future__ import annotations

import re
from typing import Final

from llooma.continuation import frame_texts

# A marker of the frame, whole or as a base model mangles it ("<<<END >>>>>>", "<<END>>",
# "<<ANSWER SO FAR>>>", "<END>>", "<<<END TAIL" at a line's end, a bare "<<<"); its closing
# half alone ("SO FAR>>>", ">>>"); and what may still grow into either.
_MARKER: Final = re.compile(
    r"<{2,}[^<>\n]{0,48}>{2,}"
    r"|<{2,}\s*/?\s*(?:ANSWER|END|TAIL)\b[^\n<>]{0,48}(?:>+|(?=\n))"
    r"|<\s*/?\s*(?-i:ANSWER|END|TAIL)\b[^\n<>]{0,48}>+"
    r"|<{3,}",
    re.I,
)
_MARKER_START: Final = re.compile(r"<{1,3}[^<>\n]{0,48}>*")
_CLOSING: Final = re.compile(r"[A-Z][A-Z ]{0,30}>{2,}|>{3,}")
_CLOSING_START: Final = re.compile(r"[A-Z][A-Z ]{0,30}>*|>+")
# How many words of a frame sentence identify it as an echo even when the rest differs (a
# shorter sentence must be echoed whole): "This is the answer" alone is ordinary text.
_OPENING_WORDS: Final = 7
# How many words of a frame sentence the stream may end in (cut off by max_tokens) for that
# opening to go as an echo at the stream's end.
_CUT_OFF_WORDS: Final = 5


def _frame_sentences() -> tuple[tuple[str, ...], ...]:
    """Every sentence of the frame's fixed text, as lowercase words."""
    texts = frame_texts()
    found: dict[tuple[str, ...], None] = {}
    for text in texts:
        for sentence in re.split(r"(?<=[.:])\s+", text.strip()):
            words = tuple(sentence.lower().split())
            if len(words) >= 4:
                found[words] = None
    return tuple(found)


_SENTENCES: Final = _frame_sentences()


def _match_words(text: str, start: int, words: tuple[str, ...]) -> tuple[int, int]:
    """How many of `words` text[start:] spells (case and whitespace aside), and where it stops.
    A word cut off by the end of `text` counts as unfinished: (-1 - words matched, len)."""
    at = start
    for matched, word in enumerate(words):
        if matched:
            if at < len(text) and not text[at].isspace():
                return matched, at
            while at < len(text) and text[at].isspace():
                at += 1
        piece = text[at : at + len(word)]
        if piece.lower() != word[: len(piece)]:
            return matched, at
        if len(piece) < len(word):
            return -1 - matched, len(text)
        at += len(word)
    return len(words), at


class FrameGuard:
    """Removes from a continuing host's text every echo of the continuation frame: its markers
    (whole or mangled) and its sentences, wherever they appear; holds back only what may still
    grow into one. Only a handed-over stream passes it, so the token hot path does not."""

    def __init__(self) -> None:
        self._held = ""
        self._dropping = False

    def feed(self, piece: str) -> str:
        return self._scan(self._held + piece, final=False)

    def flush(self) -> str:
        return self._scan(self._held, final=True)

    def _scan(self, text: str, *, final: bool) -> str:
        self._held = ""
        out: list[str] = []
        at = 0
        while at < len(text):
            if self._dropping:
                end = text.find("\n", at)
                if end == -1:
                    break
                self._dropping = False
                at = end + 1
                continue
            hit = _next_hit(text, at, final)
            if hit is None:
                out.append(text[at:])
                break
            start, end, kind = hit
            out.append(text[at:start])
            if kind == "hold":
                self._held = text[start:]
                break
            self._dropping = kind == "line"
            at = end
        if final:
            self._dropping = False
        return "".join(out)


def _next_hit(text: str, at: int, final: bool) -> tuple[int, int, str] | None:
    """The first frame echo from `at`: (start, end, "drop" | "line" | "hold"); at the stream's
    end (final) nothing is held: an unfinished marker goes, and so does a frame sentence the
    stream ends in once _CUT_OFF_WORDS of it are there; a shorter opening stays."""
    for start in range(at, len(text)):
        char = text[start]
        if char == ">" or (char.isupper() and (start == at or not text[start - 1].isalnum())):
            closing = _CLOSING.match(text, start)
            if closing is not None:
                end = _after(text, closing.end(), " \t>")
                return start, end, "hold" if end == len(text) and not final else "drop"
            if not final and _CLOSING_START.fullmatch(text, start) and len(text) - start < 34:
                return start, len(text), "hold"  # may still become a marker's closing half
            if char == ">":
                continue
        if char == "<":
            marker = _MARKER.match(text, start)
            if marker is not None:
                end = _after(text, marker.end(), " \t>")
                if end == len(text) and not final:
                    return start, end, "hold"  # more ">" or the line's end may follow
                return start, end, "drop"
            if _MARKER_START.fullmatch(text, start) and len(text) - start < 56:
                return start, len(text), "drop" if final else "hold"
            continue
        if start > at and not text[start - 1].isspace() and text[start - 1] not in "\"'(":
            continue  # frame sentences start at a word
        # Words of a frame sentence the text ends inside of (-1: none).
        unfinished = -1
        line_end = -1
        for words in _SENTENCES:
            matched, end = _match_words(text, start, words)
            if matched == len(words):
                end = _after(text, end, " \t")
                if end == len(text) and not final:
                    return start, end, "hold"  # its line's end may follow
                return start, end, "drop"
            if matched < 0:
                unfinished = max(unfinished, -1 - matched)
            elif matched >= _OPENING_WORDS:
                line_end = max(line_end, end)
        if unfinished >= 0 and not final:
            return start, len(text), "hold"
        if unfinished >= _CUT_OFF_WORDS:
            return start, len(text), "drop"
        if line_end >= 0:
            # A frame sentence's opening, then something else: the rest of its line goes too.
            return start, line_end, "line"
    return None


def _after(text: str, end: int, blanks: str) -> int:
    """Past the blanks after an echo, and its line's end."""
    while end < len(text) and text[end] in blanks:
        end += 1
    if end < len(text) and text[end] == "\n":
        end += 1
    return end


class EchoFilter:
    """Drops a continuing host's re-emission of the answer so far (from its start, or from the
    quoted tail's start) at the beginning of its output, with the blanks it was quoted with;
    holds only while it may be one."""

    def __init__(self, *echoes: str, min_chars: int = 12) -> None:
        self._echoes = [e.strip() for e in echoes if len(e.strip()) >= min_chars]
        self._min_chars = min_chars
        self._held = ""
        self._decided = not self._echoes
        self._echoed = False

    def feed(self, piece: str) -> str:
        if self._echoed:
            # Right after a dropped echo: the blanks that closed its quote go too (the seam
            # puts a space back where a sentence needs one).
            rest = piece.lstrip()
            self._echoed = not rest
            return rest
        if self._decided:
            return piece
        self._held += piece
        body = self._held.lstrip()
        for echo in self._echoes:
            if len(body) <= len(echo):
                if echo.startswith(body):
                    return ""  # still possibly the echo
            elif body.startswith(echo):
                rest = body[len(echo) :].lstrip()
                self._decide()
                self._echoed = not rest
                return rest
        out = self._held
        self._decide()
        return out

    def flush(self) -> str:
        if self._decided:
            return ""
        body = self._held.lstrip()
        echoed = len(body) >= self._min_chars and any(e.startswith(body) for e in self._echoes)
        out = "" if echoed else self._held
        self._decide()
        return out

    def _decide(self) -> None:
        self._decided = True
        self._held = ""


def prefill_messages(original: list[tuple[str, str]], emitted: str) -> list[tuple[str, str]]:
    """Continuation by prefill: the conversation with the answer so far as a trailing assistant
    message, which the engine continues as its own (no instructions, nothing to leak). A
    client's own trailing assistant message (its prefill) is extended, not repeated."""
    if original and original[-1][0] == "assistant":
        role, content = original[-1]
        return [*original[:-1], (role, content + emitted)]
    return [*original, ("assistant", emitted)]
