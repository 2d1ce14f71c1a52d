"""Deterministic structural compression to a character budget (paper, section II-C); no model call.

Rules of `compress(text, budget)`; the marker is always `ELISION_MARKER` ("[…]"):

1. Canonical form (`normalize`; steps i and iv), always applied and repeated until it is stable:
   - surrogate pairs become one code point, lone surrogates U+FFFD; CRLF and CR become LF;
   - control tokens go: `CONTROL_TOKENS`, any `<|name|>` (also with full-width bars), and the role
     name after `<|im_start|>` / `<start_of_turn>` or between `<|start_header_id|>` and
     `<|end_header_id|>`; a removed run leaves one space only between two non-space characters;
   - every line keeps its leading indentation and loses its trailing whitespace; outside fenced
     code blocks every other run of horizontal whitespace becomes one space; at most one blank
     line in a row, none at either end;
   - JSON-like text (rule 2) gets this outside string literals only: literals are never changed;
   - other text is deduplicated: a line outside fenced code that has a letter or digit and equals
     an earlier such line is dropped, and so is a fenced block equal to an earlier block.
2. Kind (`detect_kind`; step ii): "json" if, without control tokens, the text starts with `{"`,
   `{}`, `[{`, `[[`, `["` or `[]` (whitespace allowed inside) or parses as a JSON array; else
   "markdown" if a line is an ATX heading, a code fence or a block quote, or two lines are table
   rows; else "list" if list items (`-`, `*`, `+`, `•`, `1.`, `1)`) are at least half of the
   non-blank lines, "markdown" if there are fewer, and "prose" if there are none.
3. A canonical form within the budget is the result. Otherwise (steps iii and v):
   - prose, and JSON-like text that does not parse: `truncate` (rule 4);
   - markdown and list: units are lines, and fenced blocks as a whole. The skeleton shows
     headings whole, a list item as its bullet and first words (a boundary cut of its text at 40
     characters, then the marker), a code block as its fence lines around a marker line, and a
     marker line for each run of other lines (a blank line only stays before a heading). If that
     does not fit, items and code blocks count as other lines (headings outlast everything), and
     if even that does not fit, the skeleton is cut by `truncate`. Otherwise leading units are
     shown in full while the result stays within the skeleton plus 60 % of the spare budget, then
     trailing units in full while it stays within the budget, and the first unit that is neither
     (a plain line or item) gets a boundary-cut head plus the marker if that fits and is longer;
   - JSON that parses: the result is compact JSON. Its skeleton keeps every object key; a leaf
     (string, number, boolean, null, empty container) longer than `"[…]"` becomes `"[…]"`; an
     array keeps each element that has a key no earlier element of it has, and each run of the
     other elements becomes one `"[…]"` element unless that is longer. `json_skeleton_size` is the
     skeleton's length. Leaves are then shown in full in document order like markdown units (60 %
     of the spare budget from the front, the rest from the back), and a string leaf at the seam
     is cut by `truncate` inside the string, so the result is valid JSON with all keys. Below the
     skeleton size, the skeleton is cut after its last `,` `{` `[` or `:` outside strings that
     leaves room for " […]", which keeps as many keys as fit, in document order.
4. `truncate(text, budget)`: below the marker's length, the longest boundary-cut head that fits.
   Otherwise `head SEP [marker] SEP tail`, where the head gets at most 60 % of budget - 5, the
   tail the rest, and SEP is a newline where the cut falls at a line break and a space elsewhere
   (left out next to an empty head or tail). A cut is at the start (head) or end (tail) of a
   whitespace run, or right after CJK punctuation; JSON-like text also cuts after `,` `{` `[` `:`.
   Line breaks and sentence ends (JSON: after `,` `}` `]`) come first, then clause delimiters
   (JSON: after `{` `[` `:`), then other boundaries, a better kind only if it keeps at least half
   of its share. No cut precedes a combining mark, joiner, variation selector or skin tone.
5. Outside JSON, markers separated only by whitespace are merged. The result is put into
   canonical form again: it never exceeds the budget, and `compress` returns it unchanged.

Its size (~830 lines): one algorithm whose rules, above, are its specification; the
rules cross-reference each other (canonical form, kinds, cuts), so they stay in one file.
"""

from __future__ import annotations

import json
import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate, chain
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Final, Literal, NamedTuple

Kind = Literal["prose", "markdown", "list", "json"]
Role = Literal["heading", "item", "code", "blank", "body"]

ELISION_MARKER: Final = "[…]"
CONTROL_TOKENS: Final[tuple[str, ...]] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|im_sep|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|assistant|>",
    "<|user|>",
    "<|system|>",
    "<|end|>",
    "<s>",
    "</s>",
    "<unk>",
    "<pad>",
    "<bos>",
    "<eos>",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<think>",
    "</think>",
)

_MARK: Final = ELISION_MARKER
_JSON_MARK: Final = json.dumps(ELISION_MARKER, ensure_ascii=False)
_ITEM_WORDS: Final = 40
_HEAD_SHARE: Final = 6  # tenths of the budget that go to the head
_SLACK: Final = 16  # how far off an estimated length may be: a few marker and blank lines

_ROLE = r"(?:system|user|assistant|model|tool|developer|function|ipython)"
_TOKEN = "|".join(
    [
        rf"<\|im_start\|>(?:[^\S\n]*{_ROLE}\b)?[^\S\n]*\n?",
        r"<\|start_header_id\|>[^<>|\n]{0,64}<\|end_header_id\|>(?:[^\S\n]*\n){0,2}",
        rf"<start_of_turn>(?:{_ROLE}\b)?[^\S\n]*\n?",
        *(re.escape(token) for token in sorted(CONTROL_TOKENS, key=len, reverse=True)),
        r"<\|[A-Za-z0-9_.:/-]{1,64}\|>",
        r"<\uff5c[^\uff5c\s<>]{1,64}\uff5c>",
    ]
)
CONTROL_TOKEN_PATTERN: Final = re.compile(rf"(?:(?:{_TOKEN})[^\S\n]*)+")

_SURROGATES = re.compile("[\ud800-\udbff][\udc00-\udfff]|[\ud800-\udfff]")
_TOKEN_HINT = re.compile(r"<[|\uff5c/<a-z]|\[/?INST\]")
_BLANKS = re.compile(r"\n{3,}")
_MESSY = re.compile(r"[^\S\n ]|  | \n| \Z|\n\n\n|\A\n|\n\Z")
_WORDY = re.compile(r"[^\W_]")
_FENCE = re.compile(
    r"^[ \t]{0,3}(?P<fence>(?P<char>[`~])(?P=char){2,})[^\n]*"
    r"(?:\n.*?)??(?:\n[ \t]{0,3}(?P=fence)(?P=char)*[ \t]*(?=\n|\Z)|\Z)",
    re.MULTILINE | re.DOTALL,
)
_FENCE_END = re.compile(r"[ \t]{0,3}(?:`{3,}|~{3,})[ \t]*")
_JSON_STRING = r'"(?:[^"\\\n]|\\[^\n])*"?'
_JSON_LITERAL = re.compile(_JSON_STRING)
_JSON_START = re.compile(r'\{\s*["}]|\[\s*["\[{\]]')
_JSON_LEX = re.compile(r'"(?:[^"\\]|\\.)*"|[,{\[:]', re.DOTALL)
_HEADING = re.compile(r" {0,3}#{1,6}(?:[ \t]|$)")
_MD_BLOCK = re.compile(r"^ {0,3}(?:#{1,6}(?:[ \t]|$)|`{3,}|~{3,}|>)", re.MULTILINE)
_TABLE_ROW = re.compile(r"^[ \t]*\|.*\|$", re.MULTILINE)
_ITEM = re.compile(r"^([ \t]*(?:[-*+•‣◦▪]|\d{1,9}[.)])[ \t]+)(?=\S)", re.MULTILINE)
_GAP = re.compile(r"\s+|(?<=[\u3002\uff01\uff1f\u3001\uff0c\uff1b\uff1a])(?=\S)")
_JSON_GAP = re.compile(r"\s+|(?<=[,{\[:])(?=\S)")
_WS_RUN = re.compile(r"\s+")
_MARKERS = re.compile(rf"{re.escape(_MARK)}(?:\s*{re.escape(_MARK)})+")

_SENTENCE_ENDS: Final = ".!?\u2026\u3002\uff01\uff1f"
_CLAUSE_ENDS: Final = ",;:\u3001\uff0c\uff1b\uff1a\u2014\u2013"
_CLOSERS: Final = "\"')]}\u00bb\u201d\u2019\u300d\u300f\uff09*_`"
_JOINERS: Final = "\u200c\u200d" + "".join(chr(c) for c in range(0xFE00, 0xFE10))


def strip_control_tokens(text: str) -> str:
    """`text` without chat-template control tokens (see the module rules)."""
    if not _TOKEN_HINT.search(text):
        return text
    while True:
        out = CONTROL_TOKEN_PATTERN.sub(_token_gap, text)
        if out == text:
            return out
        text = out


def normalize(text: str) -> str:
    """Steps (i) and (iv): the canonical form that `compress` starts from and always returns."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATES.sub(_join_surrogates, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    while True:
        stripped = strip_control_tokens(text)
        out = _tidy_json(text) if _json_like(stripped) else _tidy_text(stripped)
        if out == text:
            return out
        text = out


def detect_kind(text: str) -> Kind:
    """Step (ii): whether the canonical form of `text` is prose, markdown, a list or JSON."""
    return _kind(normalize(text))


def json_skeleton_size(text: str) -> int:
    """Length of the smallest result of `compress` for JSON `text` that still has every key."""
    try:
        doc = _JsonDoc.parse(normalize(text))
    except RecursionError as error:
        raise ValueError("JSON nested too deeply") from error
    if doc is None:
        raise ValueError("not a JSON object or array")
    return len(doc.render(0, len(doc.leaves)))


def compress(text: str, budget: int) -> str:
    """`text` in canonical form, structurally shortened to at most `budget` characters."""
    if budget < 0:
        raise ValueError("budget must not be negative")
    canonical = normalize(text)
    if len(canonical) <= budget:
        return canonical
    kind = _kind(canonical)
    if kind == "json":
        return normalize(_compress_json(canonical, budget))
    out = truncate(canonical, budget) if kind == "prose" else _compress_markdown(canonical, budget)
    return normalize(_MARKERS.sub(_MARK, out))


def truncate(text: str, budget: int, *, json_like: bool = False) -> str:
    """Boundary-aware head (60 %) and tail (40 %) of `text` around one marker (rule 4)."""
    if len(text) <= budget:
        return text
    if budget < len(_MARK):
        return text[: _head_cut(text, budget, json_like)]
    room = budget - len(_MARK) - 2
    if room <= 0:
        return _MARK
    start = _head_cut(text, room * _HEAD_SHARE // 10, json_like)
    end = _tail_cut(text, len(text) - (room - start), json_like)
    parts = []
    if start:
        run = _WS_RUN.match(text, start)
        parts += [text[:start], "\n" if run and "\n" in run.group() else " "]
    parts.append(_MARK)
    if end < len(text):
        run_start = end
        while run_start > 0 and text[run_start - 1].isspace():
            run_start -= 1
        parts += ["\n" if "\n" in text[run_start:end] else " ", text[end:]]
    return "".join(parts)


def _token_gap(match: re.Match[str]) -> str:
    text, (start, end) = match.string, match.span()
    if start > 0 and end < len(text) and not text[start - 1].isspace():
        return "" if text[end].isspace() else " "
    return ""


def _join_surrogates(match: re.Match[str]) -> str:
    pair = match.group()
    if len(pair) == 1:
        return "\ufffd"
    return chr(0x10000 + ((ord(pair[0]) - 0xD800) << 10) + ord(pair[1]) - 0xDC00)


def _tidy_line(line: str) -> str:
    """`line` with its indentation, without trailing whitespace, other runs made one space."""
    body = line.lstrip()
    return line[: len(line) - len(body)] + " ".join(body.split()) if body else ""


def _tidy_text(text: str) -> str:
    if not _MESSY.search(text):
        lines = text.split("\n")
        distinct = set(lines)
        if len(distinct) + lines.count("") - ("" in distinct) == len(lines):
            return text
    lines = []
    seen: set[str] = set()
    for is_code, unit in _units(text):
        if is_code:
            # Code keeps its inner whitespace: indentation and alignment there carry meaning.
            unit = "\n".join(line.rstrip() for line in unit.split("\n")).rstrip("\n")
            unit = _BLANKS.sub("\n\n", unit)
            if unit not in seen:
                seen.add(unit)
                lines.append(unit)
            continue
        line = _tidy_line(unit)
        if _WORDY.search(line):
            if line in seen:
                continue
            seen.add(line)
        if line or (lines and lines[-1]):
            lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _tidy_json(text: str) -> str:
    # String literals stand aside as "" while the text between them is tidied: outside a
    # literal every quote starts one, so each "" left afterwards is exactly one literal.
    literals = _JSON_LITERAL.findall(text)
    lines: list[str] = []
    for line in map(_tidy_line, strip_control_tokens(_JSON_LITERAL.sub('""', text)).split("\n")):
        if line or (lines and lines[-1]):
            lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    pieces = "\n".join(lines).split('""')
    return "".join(chain.from_iterable(zip(pieces, [*literals, ""], strict=True)))


def _units(text: str) -> list[tuple[bool, str]]:
    """The lines of `text`, except that each fenced code block is one unit (flagged True)."""
    units: list[tuple[bool, str]] = []
    pos = 0
    for match in _FENCE.finditer(text):
        if match.start() > pos:
            units += [(False, line) for line in text[pos : match.start() - 1].split("\n")]
        units.append((True, match.group()))
        pos = match.end() + 1
    if pos <= len(text):
        units += [(False, line) for line in text[pos:].split("\n")]
    return units


def _json_like(text: str) -> bool:
    text = text.lstrip()
    if text[:1] not in ("{", "["):
        return False
    if _JSON_START.match(text):
        return True
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _kind(text: str) -> Kind:
    if _json_like(strip_control_tokens(text)):
        return "json"
    if _MD_BLOCK.search(text) or len(_TABLE_ROW.findall(text)) >= 2:
        return "markdown"
    items = len(_ITEM.findall(text))
    if not items:
        return "prose"
    nonblank = text.count("\n") + 1 - text.count("\n\n")
    return "list" if 2 * items >= nonblank else "markdown"


def _is_mark(char: str) -> bool:
    return (
        unicodedata.category(char)[0] == "M"
        or char in _JOINERS
        or "\U0001f3fb" <= char <= "\U0001f3ff"
        or "\U000e0020" <= char <= "\U000e007f"
    )


def _tier(text: str, start: int, end: int, json_like: bool) -> int:
    """1 for a line or sentence boundary, 2 for a clause delimiter, 3 for any other."""
    if text.find("\n", start, end) != -1:
        return 1
    pos = start
    if json_like:
        before = text[pos - 1] if pos else ""
        return 1 if before in (",", "}", "]") else 2 if before in ("{", "[", ":") else 3
    while pos > 0 and text[pos - 1] in _CLOSERS:
        pos -= 1
    before = text[pos - 1] if pos else ""
    if before and before in _SENTENCE_ENDS:
        return 1
    return 2 if before and text[start - 1] in _CLAUSE_ENDS else 3


def _head_cut(text: str, limit: int, json_like: bool) -> int:
    """The end of the longest boundary-cut head of `text` within `limit` characters."""
    if limit >= len(text):
        return len(text)
    if limit <= 0:
        return 0
    gaps = _JSON_GAP if json_like else _GAP
    best = [0, 0, 0, 0]
    for match in gaps.finditer(text, limit // 2, limit + 1):
        start = match.start()
        if start == 0 or text[start - 1].isspace() or _is_mark(text[start]):
            continue
        best[_tier(text, start, match.end(), json_like)] = start
    for tier in (1, 2, 3):
        if best[tier]:
            return best[tier]
    last = 0
    for match in gaps.finditer(text, 0, limit // 2 + 1):
        start = match.start()
        if start and not text[start - 1].isspace() and not _is_mark(text[start]):
            last = start
    return last


def _tail_cut(text: str, low: int, json_like: bool) -> int:
    """The start of the longest boundary-cut tail of `text` that starts at `low` or later."""
    gaps = _JSON_GAP if json_like else _GAP
    window = low + (len(text) - low) // 2
    best = [len(text)] * 4
    beyond = len(text)
    # Starting one early finds a run that ends exactly at `low`.
    for match in gaps.finditer(text, max(low - 1, 0)):
        end = match.end()
        if end < low or end >= len(text) or _is_mark(text[end]):
            continue
        if end > window:
            beyond = end
            break
        start = match.start()
        while start > 0 and text[start - 1].isspace():
            start -= 1
        tier = _tier(text, start, end, json_like)
        best[tier] = min(best[tier], end)
    for tier in (1, 2, 3):
        if best[tier] < len(text):
            return best[tier]
    return beyond


def _last_true(low: int, high: int, fits: Callable[[int], bool]) -> int:
    """The largest k in [low, high] with fits(k), given fits(low)."""
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def _search(high: int, fits: Callable[[int], bool], excess: Callable[[int], int] | None) -> int:
    """The largest k in [0, high] with fits(k), given fits(0); excess(k) estimates the overshoot."""
    low = 0
    if excess is not None:
        # Only the k whose estimate is near the limit need a real rendering.
        sure = near = 0
        for k in range(high + 1):
            over = excess(k)
            if over <= -_SLACK:
                sure = k
            if over <= _SLACK:
                near = k
        low = sure if fits(sure) else 0
        high = max(low, near)
    return _last_true(low, high, fits)


def _spread(
    render: Callable[[int, int], str],
    count: int,
    budget: int,
    skeleton: int,
    estimate: Callable[[int, int], int] | None = None,
) -> tuple[int, int]:
    """How many units to show in full from the front (60 % of the spare room) and the back."""
    target = skeleton + (budget - skeleton) * _HEAD_SHARE // 10
    head = _search(
        count,
        lambda k: len(render(k, count)) <= target,
        None if estimate is None else lambda k: estimate(k, count) - target,
    )
    tail = _search(
        count - head,
        lambda k: len(render(head, count - k)) <= budget,
        None if estimate is None else lambda k: estimate(head, count - k) - budget,
    )
    return head, count - tail


class _Unit(NamedTuple):
    role: Role
    full: str
    skeleton: str
    open_end: bool  # the skeleton ends with a marker, which absorbs a following removed run


def _code_skeleton(block: str) -> str:
    lines = block.split("\n")
    closed = len(lines) > 1 and _FENCE_END.fullmatch(lines[-1]) is not None
    if len(lines) <= (2 if closed else 1):
        return block
    skeleton = "\n".join([lines[0], _MARK, *(lines[-1:] if closed else [])])
    return skeleton if len(skeleton) < len(block) else block


def _md_unit(is_code: bool, line: str) -> _Unit:
    if is_code:
        return _Unit("code", line, _code_skeleton(line), False)
    if not line:
        return _Unit("blank", line, line, False)
    if _HEADING.match(line):
        return _Unit("heading", line, line, False)
    item = _ITEM.match(line)
    if item is None:
        return _Unit("body", line, "", False)
    prefix, content = item.group(1), line[item.end(1) :]
    if len(content) <= _ITEM_WORDS:
        return _Unit("item", line, line, False)
    cut = _head_cut(content, _ITEM_WORDS, False)
    words = content[:cut] + " " if cut else ""
    return _Unit("item", line, prefix + words + _MARK, True)


def _render_md(
    units: list[_Unit],
    head: int,
    tail: int,
    partial: str | None = None,
    costs: list[int] | None = None,
) -> str:
    """Units before `head` and from `tail` on in full, `partial` for unit `head`, else skeleton.

    `costs`, if given, receives the characters each unit adds (a flushed marker included).
    """
    lines: list[str] = []
    pending = open_end = False
    for i, unit in enumerate(units):
        if i < head or i >= tail:
            text, ends_open = unit.full, False
        elif i == head and partial is not None:
            text, ends_open = partial, True
        elif unit.role == "blank":
            if not (lines and lines[-1] and i + 1 < len(units) and units[i + 1].role == "heading"):
                continue
            text, ends_open = "", False
        elif not unit.skeleton:
            pending = True
            continue
        else:
            text, ends_open = unit.skeleton, unit.open_end
        flush = pending and not open_end
        if flush:
            lines.append(_MARK)
        if costs is not None:
            costs[i] += len(text) + 1 + (len(_MARK) + 1 if flush else 0)
        pending, open_end = False, ends_open
        lines.append(text)
    if pending and not open_end:
        lines.append(_MARK)
        if costs is not None:
            costs[-1] += len(_MARK) + 1
    return "\n".join(lines)


def _compress_markdown(text: str, budget: int) -> str:
    units = [_md_unit(is_code, unit) for is_code, unit in _units(text)]
    count = len(units)
    costs = [0] * count
    skeleton = _render_md(units, 0, count, costs=costs)
    if len(skeleton) > budget:
        # Headings are the last structure to go: list items and code blocks become gaps first.
        units = [
            _Unit(unit.role, unit.full, "", False) if unit.role in ("item", "code") else unit
            for unit in units
        ]
        costs = [0] * count
        skeleton = _render_md(units, 0, count, costs=costs)
        if len(skeleton) > budget:
            return truncate(skeleton, budget)
    gain = [
        0,
        *accumulate(len(unit.full) + 1 - cost for unit, cost in zip(units, costs, strict=True)),
    ]
    head, tail = _spread(
        lambda h, t: _render_md(units, h, t),
        count,
        budget,
        len(skeleton),
        lambda h, t: len(skeleton) + gain[h] + gain[count] - gain[t],
    )
    out = _render_md(units, head, tail)
    if head >= tail or units[head].role not in ("body", "item"):
        return out
    unit = units[head]
    kept = len(unit.skeleton) - len(_MARK) - 1 if unit.open_end else len(unit.skeleton)
    limit = budget - len(out) + len(unit.skeleton) - len(_MARK) - 1
    for _ in range(4):
        cut = _head_cut(unit.full, limit, False)
        if cut <= kept or cut >= len(unit.full):
            break
        candidate = _render_md(units, head, tail, unit.full[:cut] + " " + _MARK)
        if len(candidate) <= budget:
            return candidate
        limit -= len(candidate) - budget
    return out


def _dump(text: str) -> str:
    out = encode_basestring(text)
    # A lone surrogate must stay escaped: raw, it is not valid UTF-8.
    return encode_basestring_ascii(text) if _SURROGATES.search(out) else out


def _scalar(value: object) -> str:
    if isinstance(value, str):
        return _dump(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__repr__(value)
    return json.dumps(value)


def _offsets(parts: list[str]) -> list[int]:
    """Where each part starts in "[" + ",".join(parts) + "]", and the end of the whole."""
    at = [1]
    for part in parts:
        at.append(at[-1] + len(part) + 1)
    return at


@dataclass(slots=True)
class _Leaf:
    low: int
    high: int
    full: str
    skeleton: str
    text: str | None


@dataclass(slots=True)
class _Object:
    low: int
    high: int
    full: str
    skeleton: str
    keys: list[str]
    children: list[_Json]
    lows: list[int]
    highs: list[int]
    full_at: list[int]
    skeleton_at: list[int]


@dataclass(slots=True)
class _Array:
    low: int
    high: int
    full: str
    skeleton: str
    children: list[_Json]
    lows: list[int]
    highs: list[int]
    full_at: list[int]
    piece_first: list[int]  # the first child of each skeleton piece, then len(children)
    piece_at: list[int]
    piece_novel: list[bool]


_Json = _Leaf | _Object | _Array
_NO_KEYS: Final[frozenset[str]] = frozenset()


def _run(children: list[_Json], start: int, stop: int) -> str:
    """Array elements [start, stop) in skeleton form, or one marker element if that is shorter."""
    size = -1
    for i in range(start, stop):
        size += len(children[i].skeleton) + 1
        if size > len(_JSON_MARK):
            return _JSON_MARK
    return ",".join(child.skeleton for child in children[start:stop])


def _stretch(node: _Object | _Array, low: int, high: int) -> list[str]:
    """Children [low, high) of `node`, all in skeleton form, as parts of its rendering."""
    if isinstance(node, _Object):
        return [node.skeleton[node.skeleton_at[low] : node.skeleton_at[high] - 1]]
    first = bisect_right(node.piece_first, low) - 1
    last = bisect_right(node.piece_first, high - 1) - 1
    if first == last:
        return [_piece(node, first, low, high)]
    parts = [_piece(node, first, low, node.piece_first[first + 1])]
    if last > first + 1:
        parts.append(node.skeleton[node.piece_at[first + 1] : node.piece_at[last] - 1])
    parts.append(_piece(node, last, node.piece_first[last], high))
    return parts


def _piece(node: _Array, index: int, low: int, high: int) -> str:
    """Skeleton piece `index` of an array, clipped to the children [low, high)."""
    if node.piece_novel[index]:
        return node.children[low].skeleton
    return _run(node.children, low, high)


class _JsonDoc:
    """A parsed JSON document, rendered with some leaves in full and the rest as skeleton.

    Leaves (scalars and empty containers) are numbered in document order; a rendering shows the
    leaves before `head` and from `tail` on in full, and the others in skeleton form.
    """

    def __init__(self, value: object) -> None:
        self.leaves: list[_Leaf] = []
        self.root = self._build(value)[0]

    @classmethod
    def parse(cls, text: str) -> _JsonDoc | None:
        """The document in `text` if it is a JSON object or array, else None."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return cls(value) if isinstance(value, (dict, list)) else None

    def _build(self, value: object) -> tuple[_Json, frozenset[str]]:
        low = len(self.leaves)
        if isinstance(value, dict) and value:
            keys = [_dump(key) for key in value]
            built = [self._build(item) for item in value.values()]
            children = [child for child, _ in built]
            names = frozenset(value).union(*(sub for _, sub in built))
            full = [f"{k}:{c.full}" for k, c in zip(keys, children, strict=True)]
            small = [f"{k}:{c.skeleton}" for k, c in zip(keys, children, strict=True)]
            node: _Json = _Object(
                low,
                len(self.leaves),
                "{" + ",".join(full) + "}",
                "{" + ",".join(small) + "}",
                keys,
                children,
                [child.low for child in children],
                [child.high for child in children],
                _offsets(full),
                _offsets(small),
            )
            return node, names
        if isinstance(value, list) and value:
            built = [self._build(item) for item in value]
            children = [child for child, _ in built]
            seen: set[str] = set()
            first: list[int] = []
            novel: list[bool] = []
            for i, (_, sub) in enumerate(built):
                new = not sub <= seen
                seen |= sub
                if new or not novel or novel[-1]:
                    first.append(i)
                    novel.append(new)
            first.append(len(children))
            pieces = [
                children[a].skeleton if new else _run(children, a, b)
                for a, b, new in zip(first, first[1:], novel, strict=False)
            ]
            full = [child.full for child in children]
            node = _Array(
                low,
                len(self.leaves),
                "[" + ",".join(full) + "]",
                "[" + ",".join(pieces) + "]",
                children,
                [child.low for child in children],
                [child.high for child in children],
                _offsets(full),
                first,
                _offsets(pieces),
                novel,
            )
            return node, frozenset(seen)
        text = _scalar(value)
        short = text if len(text) <= len(_JSON_MARK) else _JSON_MARK
        leaf = _Leaf(low, low + 1, text, short, value if isinstance(value, str) else None)
        self.leaves.append(leaf)
        return leaf, _NO_KEYS

    def render(self, head: int, tail: int, partial: str | None = None) -> str:
        """Leaves before `head` and from `tail` on in full, `partial` for leaf `head`."""
        return self._render(self.root, head, tail, partial)

    def _middle(self, node: _Json, head: int, tail: int, partial: str | None) -> bool:
        hit = partial is not None and node.low <= head < node.high
        return head <= node.low and node.high <= tail and not hit

    def _render(self, node: _Json, head: int, tail: int, partial: str | None) -> str:
        if node.high <= head or node.low >= tail:
            return node.full
        if self._middle(node, head, tail, partial):
            return node.skeleton
        if isinstance(node, _Leaf):
            return partial if partial is not None else node.skeleton
        # Children wholly before `head` or from `tail` on come from the full text, children
        # wholly in between from the skeleton: only the (at most two) children on a seam recurse.
        count = len(node.children)
        start, stop = bisect_right(node.highs, head), bisect_left(node.lows, tail)
        parts = [node.full[1 : node.full_at[start] - 1]] if start else []
        low, high = start, stop
        right = None
        if low < high and not self._middle(node.children[low], head, tail, partial):
            parts.append(self._entry(node, low, head, tail, partial))
            low += 1
        if low < high and not self._middle(node.children[high - 1], head, tail, partial):
            right = self._entry(node, high - 1, head, tail, partial)
            high -= 1
        if low < high:
            parts += _stretch(node, low, high)
        if right is not None:
            parts.append(right)
        if stop < count:
            parts.append(node.full[node.full_at[stop] : -1])
        return node.full[0] + ",".join(parts) + node.full[-1]

    def _entry(self, node: _Object | _Array, i: int, head: int, tail: int, part: str | None) -> str:
        rendered = self._render(node.children[i], head, tail, part)
        return f"{node.keys[i]}:{rendered}" if isinstance(node, _Object) else rendered

    def compress(self, budget: int) -> str:
        """The fullest rendering within `budget`, or the skeleton cut after its first keys."""
        count = len(self.leaves)
        skeleton = self.render(0, count)
        if len(skeleton) > budget:
            return _cut_keys(skeleton, budget)
        head, tail = _spread(self.render, count, budget, len(skeleton))
        out = self.render(head, tail)
        leaf = self.leaves[head] if head < tail else None
        if leaf is None or leaf.text is None:
            return out
        room = budget - len(out) + len(leaf.skeleton) - 2
        for _ in range(4):
            if room < len(_MARK):
                break
            piece = _dump(truncate(leaf.text, room))
            if len(piece) <= len(leaf.skeleton):
                break
            candidate = self.render(head, tail, piece)
            if len(candidate) <= budget:
                return candidate
            room -= len(candidate) - budget
        return out


def _cut_keys(skeleton: str, budget: int) -> str:
    limit = budget if budget < len(_MARK) else budget - len(_MARK) - 1
    cut = 0
    for match in _JSON_LEX.finditer(skeleton):
        if match.end() > limit:
            break
        if len(match.group()) == 1:
            cut = match.end()
    if budget < len(_MARK):
        return skeleton[:cut]
    return f"{skeleton[:cut]} {_MARK}" if cut else _MARK


def _compress_json(text: str, budget: int) -> str:
    try:
        doc = _JsonDoc.parse(text)
        if doc is not None:
            return doc.compress(budget)
    except RecursionError:
        pass
    return truncate(text, budget, json_like=True)
