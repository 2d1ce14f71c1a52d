"""The answer-text policy: what is removed from text on its way to a client, one rule for every
path (the racer's relay and duels, the aggregator's split answers).

Hosts are untrusted, so chat-template control tokens and terminal control characters go, even
when a host splits them across chunks, and how much a host tried to slip through is counted
against it. Removed: the `<|name|>` family (`<|im_end|>`, `<|eot_id|>`, ...), its full-width-bar
twin (U+FF5C, DeepSeek's), the role line after `<|im_start|>`, C0/C1 control characters but tab,
newline and carriage return, ANSI escapes and the bidi overrides. Kept: `<s>`, `</s>`, `<think>`,
`[INST]`, `<<SYS>>` and the like. They are ordinary text in answers people ask for ("Use
<s>old</s> price" is HTML, a prompt-format tutorial quotes `[INST]`), no engine emits them as
text when it serves its own template, and stripping them would corrupt honest answers while the
`<|...|>` family is never legitimate answer text and is what injection into a terminal or a
downstream template needs. The compressor's wider list (llooma.compress.CONTROL_TOKENS) is for
model-bound text (prompts built from earlier answers), not for what a client reads.

Text is held back only while it can still become a removed token."""

from __future__ import annotations

import re
from typing import Final

# C0 and C1 control characters except NUL, tab, newline and carriage return (ANSI escapes,
# bell, ...), and the Unicode bidi overrides that can disguise text on a terminal. NUL does
# nothing on a terminal and is content a user may have sent (an answer that quotes it keeps it).
_CONTROL_CHARS: Final = re.compile(
    r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]"
)
_NAME: Final = r"[A-Za-z0-9_.:/-]"
_WIDE_NAME: Final = r"[^\uff5c\s<>]"
_ROLE_LINE: Final = r"[^\S\n]*[A-Za-z_]{1,32}[^\S\n]*\n?"
_CONTROL_TOKENS: Final = re.compile(
    rf"<\|im_start\|>(?:{_ROLE_LINE})?|<\|{_NAME}{{1,64}}\|>|<\uff5c{_WIDE_NAME}{{1,64}}\uff5c>"
)
# What may still grow into a control token or an escape sequence: held until the next chunk.
_UNFINISHED: Final = re.compile(
    rf"<(?:\|(?:{_NAME}{{0,64}}\|?)?)?"
    r"|<\|im_start\|>[^\S\n]*[A-Za-z_]{0,32}[^\S\n]*"
    rf"|<(?:\uff5c{_WIDE_NAME}{{0,64}})?"
    r"|\x1b(?:\[[0-9;?]*[ -/]*)?"
)
# Anything that may start a control token or is a control character: the fast path is a miss.
_SUSPECT: Final = re.compile(r"[<\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# A chunk is a token or a few a backend coalesced (a whole JSON reply from some): one longer
# than this is a flood, cut (a violation).
MAX_CHUNK_CHARS: Final = 4096
# With max_tokens set, an answer's text is capped at this many characters per token.
MAX_CHARS_PER_TOKEN: Final = 16
# Where a held run may begin: a control token with its role line is never longer.
_LONGEST_HOLD: Final = 120


def clean(text: str) -> str:
    """`text` without control tokens and control characters."""
    return _CONTROL_CHARS.sub("", _CONTROL_TOKENS.sub("", text))


def _unfinished_start(text: str) -> int:
    """Where the unfinished control token or escape at the end of `text` begins, or -1."""
    start = max(0, len(text) - _LONGEST_HOLD)
    while True:
        at = min(
            (i for i in (text.find("<", start), text.find("\x1b", start)) if i >= 0),
            default=-1,
        )
        if at < 0:
            return -1
        if _UNFINISHED.fullmatch(text, at):
            return at
        start = at + 1


class Sanitizer:
    """Cleans one stream chunk by chunk; holds back a possible control token's beginning until
    the next chunk shows whether it is one. `removed` counts the characters taken out."""

    __slots__ = ("_held", "removed")

    def __init__(self) -> None:
        self._held = ""
        self.removed = 0

    def feed(self, text: str) -> str:
        if not self._held and not _SUSPECT.search(text):
            return text
        text = self._held + text
        cut = _unfinished_start(text)
        if cut >= 0:
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
