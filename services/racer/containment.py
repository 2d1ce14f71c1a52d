"""What a host's text must pass before a client sees it: hosts are untrusted, so chat-template
control tokens and terminal control characters are removed, even when a host splits them
across chunks, and how much a host tried to slip through is counted against it."""

from __future__ import annotations

import re
from typing import Final

from llooma.compress import strip_control_tokens

# C0 and C1 control characters except tab, newline and carriage return (ANSI escapes, NUL,
# bell, ...), and the Unicode bidi overrides that can disguise text on a terminal.
_CONTROL_CHARS: Final = re.compile(
    r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
)
# Anything that may start a control token or is a control character: the fast path is a miss.
_SUSPECT: Final = re.compile(
    r"[<\[\uff5c\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
)
# A control token is at most this long; an unclosed `<` or `[` further back is plain text.
_LONGEST_TOKEN: Final = 80


def clean(text: str) -> str:
    """`text` without control tokens and control characters."""
    return _CONTROL_CHARS.sub("", strip_control_tokens(text))


class Sanitizer:
    """Cleans one stream chunk by chunk; holds back a possible control token's beginning until
    the next chunk shows whether it is one."""

    __slots__ = ("_held", "removed")

    def __init__(self) -> None:
        self._held = ""
        self.removed = 0

    def feed(self, text: str) -> str:
        if not self._held and not _SUSPECT.search(text):
            return text
        text = self._held + text
        cut = max(text.rfind("<"), text.rfind("["), text.rfind("\uff5c"))
        if cut > 0 and text[cut - 1] == "\x1b":
            cut -= 1  # an escape sequence's start stays whole
        if cut >= 0 and len(text) - cut <= _LONGEST_TOKEN and not _closed(text[cut:]):
            text, self._held = text[:cut], text[cut:]
        else:
            self._held = ""
        return self._clean(text)

    def flush(self) -> str:
        text, self._held = self._held, ""
        return self._clean(text)

    def _clean(self, text: str) -> str:
        out = clean(text)
        self.removed += len(text) - len(out)
        return out


def _closed(tail: str) -> bool:
    return ">" in tail or "]" in tail
