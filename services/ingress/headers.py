"""The request headers LLooMA reads, validated in one place: the route parses them with
`parse_options`, and the OpenAPI description is built from the same names and patterns."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

# A client may set its own first-token deadline δ for one request.
DEADLINE_HEADER = "x-llooma-first-token-deadline-ms"
# ... and how many hosts race for it (1 to 3).
RACE_WIDTH_HEADER = "x-llooma-race-width"
# ... whether quasi-identifiers are redacted too ("strict") or not ("standard", the default).
PRIVACY_HEADER = "x-llooma-privacy"
# ... and whether the planner may split it ("auto", the default, or "off").
SPLIT_HEADER = "x-llooma-split"

DEADLINE_MAX_MS = 60_000
# Whole milliseconds from 1 to 60000 (leading zeros allowed), or empty: what parse_options takes.
DEADLINE_PATTERN = "^(0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|60000))?$"
RACE_WIDTHS = ("", "1", "2", "3")
PRIVACY_MODES = ("", "standard", "strict")
SPLIT_MODES = ("auto", "off")

_DEADLINE = re.compile(DEADLINE_PATTERN)


class InvalidHeader(ValueError):
    """A request header with a value LLooMA does not take; the message says which values do."""


@dataclass(frozen=True)
class RequestOptions:
    deadline_ms: int = 0  # 0: the model's or the default deadline
    race_width: int = 0  # 0: the configured width
    privacy: str = ""  # "", "standard" or "strict"
    no_split: bool = False


def parse_options(headers: Mapping[str, str]) -> RequestOptions:
    deadline = headers.get(DEADLINE_HEADER, "")
    # ASCII only: "²".isdecimal() holds for a latin-1 header byte, and int() would take it.
    if not deadline.isascii() or not _DEADLINE.fullmatch(deadline):
        raise InvalidHeader(f"{DEADLINE_HEADER} must be whole milliseconds from 1 to 60000")
    width = headers.get(RACE_WIDTH_HEADER, "")
    if width not in RACE_WIDTHS:
        raise InvalidHeader(f"{RACE_WIDTH_HEADER} must be 1, 2 or 3")
    privacy = headers.get(PRIVACY_HEADER, "")
    if privacy not in PRIVACY_MODES:
        raise InvalidHeader(f"{PRIVACY_HEADER} must be standard or strict")
    split = headers.get(SPLIT_HEADER, "auto")
    if split not in SPLIT_MODES:
        raise InvalidHeader(f"{SPLIT_HEADER} must be auto or off")
    return RequestOptions(
        deadline_ms=int(deadline or 0),
        race_width=int(width or 0),
        privacy=privacy,
        no_split=split == "off",
    )
