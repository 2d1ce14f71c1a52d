"""Continuation operator: hand an emitted prefix to a fallback model and de-duplicate its output.

Overlap rule (`drop_overlap`, `OverlapFilter`): let T be the tail without its trailing
whitespace. The dropped part D is the longest leading part of the suffix such that the core
D.strip() has at least `min_overlap` characters and T ends with it literally. D may carry
leading whitespace, and trailing whitespace only when the tail itself ends in whitespace (so the
seam does not double the whitespace). Only the start of the suffix is ever dropped, and
only text that re-emits the end of the tail, so nothing new is ever lost. Inherent limit: a
legitimate continuation that happens to start by repeating the tail's last `min_overlap` or more
characters (e.g. a list of equal numbers) loses that repeat; raise `min_overlap` if that matters.
"""

from __future__ import annotations

import codecs
import re
from typing import Final, Literal

Format = Literal["prose", "json", "markdown"]
FORMATS: Final[tuple[Format, ...]] = ("prose", "json", "markdown")

ANSWER_START: Final = "<<<ANSWER SO FAR>>>"
ANSWER_END: Final = "<<<END>>>"
TAIL_START: Final = "<<<TAIL>>>"
TAIL_END: Final = "<<<END TAIL>>>"

_HEAD: Final = "Your answer to the conversation above was cut off. This is the answer so far:\n"
_MIDDLE: Final = (
    "Continue the answer exactly where it stops, in the same format ({fmt}). Do not repeat any "
    "of the answer so far, in particular not its last part:\n"
)
_FOOT: Final = "Output only the continuation, with no preamble and no markers."

_MARKDOWN_LINE = re.compile(r"^ {0,3}(?:#|[-*] |\d+\. |```)", re.MULTILINE)
_SURROGATES = re.compile("[\ud800-\udfff]")
_SENTENCE_ENDS: Final = ".!?"
# CJK prose has no space after a full stop, so these end a sentence whatever follows.
_CJK_SENTENCE_ENDS: Final = "\u3002\uff01\uff1f"
_CLOSERS: Final = "\"')]}\u00bb\u201d\u2019\u300d\u300f\uff09"
_JSON_DELIMITERS: Final = ",{[:}]"
_JSON_WHITESPACE: Final = " \t\n\r"


def detect_format(text: str) -> Format:
    """Guess the output format of `text` from its shape."""
    if text.lstrip().startswith(("{", "[")):
        return "json"
    if _MARKDOWN_LINE.search(text):
        return "markdown"
    return "prose"


def canonical_utf8(data: bytes | str) -> str:
    """Text that always encodes as UTF-8, without an incomplete trailing code point."""
    if isinstance(data, bytes):
        # A non-final incremental decode holds back (here: drops) a trailing sequence that is
        # still a valid start of a code point, and replaces invalid bytes everywhere else.
        return codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False)
    try:
        data.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("", data)
    return data


def safe_prefix(text: str, fmt: str) -> str:
    """The longest prefix of the canonical text that ends on a safe boundary for `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    text = canonical_utf8(text)
    if fmt == "prose":
        return text[: _prose_cut(text)]
    if fmt == "json":
        return text[: _json_cut(text)]
    return text[: text.rfind("\n") + 1]


def _prose_cut(text: str) -> int:
    end = len(text)
    while end > 0 and text[end - 1] in _CLOSERS:
        end -= 1
    # The text's own end after a sentence end is a boundary; inside the text a sentence end is
    # followed by whitespace anyway, except in "3.14", "e.g.x" and the like, which are words.
    if end > 0 and text[end - 1] in _SENTENCE_ENDS + _CJK_SENTENCE_ENDS:
        return len(text)
    for i in range(len(text) - 1, -1, -1):
        char = text[i]
        if char.isspace():
            return i + 1
        if char in _CJK_SENTENCE_ENDS:
            cut = i + 1
            while cut < len(text) and text[cut] in _CLOSERS:
                cut += 1
            return cut
    return 0


def _json_cut(text: str) -> int:
    cut = 0
    in_string = escaped = after_delimiter = False
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            after_delimiter = False
        elif char in _JSON_DELIMITERS:
            cut = i + 1
            after_delimiter = True
        elif char in _JSON_WHITESPACE:
            if after_delimiter:
                cut = i + 1
        else:
            after_delimiter = False
    return cut


def tail_window(prefix: str, chars: int = 200) -> str:
    """The last ~`chars` characters of `prefix`, starting at a word start when one is near."""
    if chars <= 0:
        return ""
    if len(prefix) <= chars:
        return prefix
    start = len(prefix) - chars
    # Only move to a word start within the first half, so the window stays about `chars` long.
    for i in range(start, start + chars // 2 + 1):
        if prefix[i - 1].isspace() and not prefix[i].isspace():
            return prefix[i:]
    return prefix[start:]


def _check_overlap_args(min_overlap: int, limit: int | None) -> None:
    if min_overlap < 1:
        raise ValueError("min_overlap must be at least 1")
    if limit is not None and limit < 0:
        raise ValueError("the overlap limit must not be negative")


def drop_overlap(
    tail: str, suffix: str, *, min_overlap: int = 3, max_overlap: int | None = None
) -> str:
    """`suffix` without a leading part that re-emits the end of `tail` (see the module rule)."""
    _check_overlap_args(min_overlap, max_overlap)
    core_tail = tail.rstrip()
    tail_has_space = len(core_tail) < len(tail)
    body = suffix.lstrip()
    lead = len(suffix) - len(body)
    limit = len(suffix) if max_overlap is None else min(max_overlap, len(suffix))
    # The longest core yields the longest drop, since a shorter core plus its trailing
    # whitespace still ends before the longer core's last (non-space) character.
    for k in range(min(len(core_tail), len(body), limit - lead), min_overlap - 1, -1):
        # `core_tail` ends in non-space, so a match is a stripped core, as the rule requires.
        if not core_tail.endswith(body[:k]):
            continue
        dropped = lead + k
        if tail_has_space:
            dropped = min(limit, lead + len(body) - len(body[k:].lstrip()))
        return suffix[dropped:]
    return suffix


class OverlapFilter:
    """Streaming `drop_overlap`: feed the suffix piece by piece, then flush."""

    def __init__(self, tail: str, *, min_overlap: int = 3, max_hold: int | None = None) -> None:
        _check_overlap_args(min_overlap, max_hold)
        self._tail = tail
        self._core_tail = tail.rstrip()
        self._tail_has_space = len(self._core_tail) < len(tail)
        self._min_overlap = min_overlap
        self._max_hold = max_hold
        self._held = ""
        self._decided = False

    @property
    def held(self) -> str:
        """Text received but not yet released."""
        return self._held

    def feed(self, piece: str) -> str:
        """Text that is safe to emit now."""
        if self._decided:
            return piece
        self._held += piece
        if self._could_grow(self._held):
            return ""
        return self._release()

    def flush(self) -> str:
        """Whatever is still held at the end of the stream."""
        if self._decided:
            return ""
        return self._release()

    def _release(self) -> str:
        self._decided = True
        out = drop_overlap(
            self._tail, self._held, min_overlap=self._min_overlap, max_overlap=self._max_hold
        )
        self._held = ""
        return out

    def _could_grow(self, held: str) -> bool:
        """Whether more text could still make a longer leading part of `held` droppable."""
        if self._max_hold is not None and len(held) >= self._max_hold:
            return False
        body = held.lstrip()
        if not body:
            return len(self._core_tail.lstrip()) >= self._min_overlap
        core_tail = self._core_tail
        # More non-space text can follow only if `body` occurs in the tail before its very end.
        if len(body) < len(core_tail) and core_tail.find(body, 0, len(core_tail) - 1) != -1:
            return True
        # More whitespace can follow a complete repeat only when the tail ends in whitespace.
        return self._tail_has_space and core_tail.endswith(body.rstrip())


def _frame(fmt: str) -> tuple[str, str, str]:
    """The fixed text before the prefix, between prefix and tail, and after the tail."""
    return (
        f"{_HEAD}{ANSWER_START}\n",
        f"\n{ANSWER_END}\n{_MIDDLE.format(fmt=fmt)}{TAIL_START}\n",
        f"\n{TAIL_END}\n{_FOOT}",
    )


def continuation_messages(
    original: list[tuple[str, str]], prefix: str, fmt: Format, tail: str
) -> list[tuple[str, str]]:
    """The original conversation plus a user message asking to continue after `prefix`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    head, middle, foot = _frame(fmt)
    return [*original, ("user", f"{head}{prefix}{middle}{tail}{foot}")]


def extract_prefix(message: str) -> str | None:
    """The answer so far quoted in a `continuation_messages` request, or None."""
    splits: list[tuple[str, str]] = []
    for fmt in FORMATS:
        head, middle, foot = _frame(fmt)
        # The request may have been merged into the user's own last turn: find where it starts.
        start = message.find(head)
        if start == -1 or not message.endswith(foot):
            continue
        body = message[start + len(head) : len(message) - len(foot)]
        at = body.find(middle)
        while at != -1:
            splits.append((body[:at], body[at + len(middle) :]))
            at = body.find(middle, at + 1)
    # Quoted text that itself contains the marker lines makes several splits fit; the real one
    # is the split whose tail is a tail of its prefix, as `tail_window` makes it.
    for prefix, tail in splits:
        if prefix.endswith(tail):
            return prefix
    return splits[0][0] if splits else None


def frame_texts() -> list[str]:
    """The fixed text of every continuation frame (for llooma.continuation_guard)."""
    return [_HEAD, _FOOT, *(_MIDDLE.format(fmt=fmt) for fmt in FORMATS)]
