"""The continuation operator: safe prefixes, canonical UTF-8, overlap removal and the prompt."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llooma.continuation import (
    ANSWER_END,
    ANSWER_START,
    FORMATS,
    TAIL_END,
    TAIL_START,
    Format,
    OverlapFilter,
    canonical_utf8,
    continuation_messages,
    detect_format,
    drop_overlap,
    extract_prefix,
    safe_prefix,
    tail_window,
)

JSON_SPACE = " \t\n\r"
SENTENCE_END = re.compile(
    r"[.!?\u3002\uff01\uff1f][\"')\]}\u00bb\u201d\u2019\u300d\u300f\uff09]*\Z"
)
CJK_END = re.compile(r"[\u3002\uff01\uff1f][\"')\]}\u00bb\u201d\u2019\u300d\u300f\uff09]*\Z")
STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)

# Small alphabets make repeats, boundaries and string delimiters frequent.
prose_text = st.text(alphabet="ab .!?\"')\n\u3002\u300d\u00e9\U0001f600")
json_ish_text = st.text(alphabet='ab{}[],:"\\ \n')
any_text = st.text(st.characters(codec=None))
overlap_text = st.text(alphabet="ab. \n", max_size=30)
json_values = st.recursive(
    st.text(alphabet=st.sampled_from('a "\\/,{}[]:\n\t\u00e9\U0001f600')) | st.integers(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(alphabet='k"\\,:{', max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


def prose_boundary(text: str, i: int) -> bool:
    before = text[:i]
    if i == 0 or before[-1].isspace():
        return True
    if CJK_END.search(before) and (i == len(text) or text[i] not in "\"')]}\u00bb\u201d\u2019"):
        return True
    return bool(SENTENCE_END.search(before)) and i == len(text)


def inside_string(document: str, i: int) -> bool:
    return any(m.start() < i < m.end() for m in STRING_LITERAL.finditer(document))


def json_boundary(document: str, i: int) -> bool:
    before = document[:i].rstrip(JSON_SPACE)
    return i == 0 or (not inside_string(document, i) and before[-1:] in list(",{[:}]"))


def markdown_boundary(text: str, i: int) -> bool:
    return i == 0 or text[i - 1] == "\n"


@given(any_text, st.sampled_from(FORMATS))
def test_safe_prefix_is_a_valid_utf8_prefix(text: str, fmt: str) -> None:
    cut = safe_prefix(text, fmt)
    canonical = canonical_utf8(text)
    assert canonical.startswith(cut)
    cut.encode("utf-8")
    if fmt == "prose":
        assert cut == "" or cut[-1].isspace() or SENTENCE_END.search(cut)
    elif fmt == "json":
        assert cut == "" or cut.rstrip(JSON_SPACE)[-1:] in list(",{[:}]")
    else:
        assert cut == "" or cut.endswith("\n")


@given(prose_text)
def test_prose_cut_is_the_last_boundary(text: str) -> None:
    cut = safe_prefix(text, "prose")
    assert text.startswith(cut)
    assert prose_boundary(text, len(cut))
    assert not any(prose_boundary(text, j) for j in range(len(cut) + 1, len(text) + 1))


@given(prose_text)
def test_prose_cut_never_ends_mid_word(text: str) -> None:
    cut = safe_prefix(text, "prose")
    if cut and cut != text:
        following = text[len(cut)]
        assert cut[-1].isspace() or CJK_END.search(cut) or not following.isalnum()


@given(json_values, st.booleans(), st.data())
def test_json_cut_never_ends_inside_a_string(
    value: object, ascii_only: bool, data: st.DataObject
) -> None:
    document = json.dumps(
        value, ensure_ascii=ascii_only, indent=data.draw(st.sampled_from([None, 1]))
    )
    end = data.draw(st.integers(0, len(document)))
    cut = safe_prefix(document[:end], "json")
    assert document.startswith(cut)
    assert not inside_string(document, len(cut))
    assert json_boundary(document, len(cut))
    assert not any(json_boundary(document, j) for j in range(len(cut) + 1, end + 1))


@given(json_ish_text)
def test_json_cut_on_arbitrary_text_ends_after_a_delimiter(text: str) -> None:
    cut = safe_prefix(text, "json")
    assert text.startswith(cut)
    assert cut == "" or cut.rstrip(JSON_SPACE)[-1] in ",{[:}]"


@given(any_text)
def test_markdown_cut_is_the_last_line_end(text: str) -> None:
    cut = safe_prefix(text, "markdown")
    canonical = canonical_utf8(text)
    assert markdown_boundary(canonical, len(cut))
    assert "\n" not in canonical[len(cut) :]


def test_safe_prefix_examples() -> None:
    assert safe_prefix("The fox jum", "prose") == "The fox "
    assert safe_prefix("The fox jumped.", "prose") == "The fox jumped."
    assert safe_prefix('He said "stop!"', "prose") == 'He said "stop!"'
    assert safe_prefix("Pi is 3.14", "prose") == "Pi is "
    assert safe_prefix("nospace", "prose") == ""
    assert safe_prefix('{"a": "x, {y', "json") == '{"a": '
    assert safe_prefix('{"a": "q\\"", "b": [1, 2', "json") == '{"a": "q\\"", "b": [1, '
    assert safe_prefix("[1, 2]\n  ", "json") == "[1, 2]\n  "
    assert safe_prefix("# Title\n- one\n- tw", "markdown") == "# Title\n- one\n"
    assert safe_prefix("abc\ud83d", "prose") == ""
    with pytest.raises(ValueError, match="unknown format"):
        safe_prefix("x", "yaml")


@given(st.text(), st.data())
def test_canonical_utf8_of_a_cut_is_the_longest_decodable_prefix(
    text: str, data: st.DataObject
) -> None:
    encoded = text.encode("utf-8")
    end = data.draw(st.integers(0, len(encoded)))
    longest = next(encoded[:j].decode("utf-8") for j in range(end, -1, -1) if _decodes(encoded[:j]))
    assert canonical_utf8(encoded[:end]) == longest


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@given(st.binary())
def test_canonical_utf8_of_any_bytes_encodes(data: bytes) -> None:
    canonical_utf8(data).encode("utf-8")


@given(any_text)
def test_canonical_utf8_of_str_drops_only_surrogates(text: str) -> None:
    canonical = canonical_utf8(text)
    canonical.encode("utf-8")
    assert canonical == "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)


def test_canonical_utf8_examples() -> None:
    assert canonical_utf8("h\u00e9\U0001f600".encode()[:-2]) == "h\u00e9"
    assert canonical_utf8(b"a\xffb\xe2\x82") == "a\ufffdb"
    assert canonical_utf8("x\udc80y") == "xy"


def test_detect_format() -> None:
    assert detect_format('  {"a": 1') == "json"
    assert detect_format("[1, 2") == "json"
    assert detect_format("Intro\n# Heading\nText") == "markdown"
    assert detect_format("- item\n- item") == "markdown"
    assert detect_format("1. first") == "markdown"
    assert detect_format("```python\nx = 1\n```") == "markdown"
    assert detect_format("Just a sentence - with a dash.") == "prose"


@given(st.text(alphabet="ab \n", max_size=60), st.integers(0, 30))
def test_tail_window_is_a_short_tail(prefix: str, chars: int) -> None:
    tail = tail_window(prefix, chars)
    assert prefix.endswith(tail)
    assert len(tail) <= chars
    if len(prefix) <= chars:
        assert tail == prefix


def test_tail_window_starts_at_a_word() -> None:
    assert tail_window("alpha beta gamma delta", 12) == "gamma delta"
    assert tail_window("x" * 50, 10) == "x" * 10
    assert tail_window("short", 200) == "short"


def dropped_part(suffix: str, result: str) -> str:
    assert suffix.endswith(result)
    return suffix[: len(suffix) - len(result)]


@given(overlap_text, overlap_text, st.integers(1, 5))
def test_drop_overlap_only_drops_a_repeat_of_the_tail(
    tail: str, suffix: str, min_overlap: int
) -> None:
    result = drop_overlap(tail, suffix, min_overlap=min_overlap)
    dropped = dropped_part(suffix, result)
    if dropped:
        assert len(dropped.strip()) >= min_overlap
        assert tail.rstrip().endswith(dropped.strip())
        assert dropped.strip() in tail


@given(overlap_text, st.data(), overlap_text)
def test_drop_overlap_drops_a_restart_within_the_tail(
    tail: str, data: st.DataObject, new: str
) -> None:
    repeat = tail[data.draw(st.integers(0, len(tail))) :]
    result = drop_overlap(tail, repeat + new)
    dropped = dropped_part(repeat + new, result)
    assert tail.rstrip().endswith(dropped.strip())
    if len(repeat.strip()) >= 3:
        assert len(dropped) >= len(repeat)


def test_drop_overlap_examples() -> None:
    tail = "The quick brown fox jumps over the lazy dog."
    assert drop_overlap(tail, " over the lazy dog. It then slept.") == " It then slept."
    assert drop_overlap(tail, "lazy dog. It then slept.") == " It then slept."
    assert drop_overlap(tail, " It then slept.") == " It then slept."
    assert drop_overlap(tail, "g. Then") == "g. Then"
    assert drop_overlap(tail + " ", "dog. It slept.") == "It slept."
    assert drop_overlap(tail, "dog. It", max_overlap=3) == "dog. It"
    assert drop_overlap("", "anything") == "anything"
    with pytest.raises(ValueError, match="min_overlap"):
        drop_overlap(tail, "x", min_overlap=0)


@st.composite
def split_stream(draw: st.DrawFn) -> tuple[str, str, list[str]]:
    tail = draw(overlap_text)
    start = draw(st.integers(0, len(tail)))
    suffix = draw(st.sampled_from(["", tail[start:]])) + draw(overlap_text)
    cuts = sorted(draw(st.lists(st.integers(0, len(suffix)), max_size=8)))
    bounds = [0, *cuts, len(suffix)]
    return tail, suffix, [suffix[a:b] for a, b in itertools.pairwise(bounds)]


@given(split_stream(), st.integers(1, 4))
def test_overlap_filter_matches_drop_overlap(
    stream: tuple[str, str, list[str]], min_overlap: int
) -> None:
    tail, suffix, pieces = stream
    overlap_filter = OverlapFilter(tail, min_overlap=min_overlap)
    out = "".join(overlap_filter.feed(piece) for piece in pieces) + overlap_filter.flush()
    assert out == drop_overlap(tail, suffix, min_overlap=min_overlap)


@given(split_stream(), st.integers(0, 12))
def test_overlap_filter_holds_at_most_max_hold(
    stream: tuple[str, str, list[str]], max_hold: int
) -> None:
    tail, suffix, pieces = stream
    overlap_filter = OverlapFilter(tail, max_hold=max_hold)
    out = ""
    for piece in pieces:
        out += overlap_filter.feed(piece)
        assert len(overlap_filter.held) < max(max_hold, 1)
    out += overlap_filter.flush()
    assert out == drop_overlap(tail, suffix, max_overlap=max_hold)


def test_overlap_filter_streams_after_the_repeat() -> None:
    overlap_filter = OverlapFilter("The quick brown fox jumps over the lazy dog.")
    pieces = [" over", " the", " lazy", " dog.", " It", " then", " slept."]
    emitted = [overlap_filter.feed(piece) for piece in pieces]
    assert emitted == ["", "", "", "", " It", " then", " slept."]
    assert overlap_filter.flush() == ""


@given(st.text(max_size=80), st.sampled_from(FORMATS), st.data())
def test_continuation_messages_round_trip(prefix: str, fmt: Format, data: st.DataObject) -> None:
    tail = data.draw(st.sampled_from([tail_window(prefix, 20), prefix, ""]))
    original = [("system", "Be brief."), ("user", "Tell me a story.")]
    messages = continuation_messages(original, prefix, fmt, tail)
    assert messages[: len(original)] == original
    role, content = messages[-1]
    assert role == "user"
    assert prefix in content
    assert f"({fmt})" in content
    assert f"{TAIL_START}\n{tail}\n{TAIL_END}" in content
    assert extract_prefix(content) == prefix


def test_continuation_message_text() -> None:
    prefix = "Once upon a time, a fox "
    messages = continuation_messages([("user", "A story.")], prefix, "prose", "a fox ")
    content = messages[-1][1]
    assert f"{ANSWER_START}\n{prefix}\n{ANSWER_END}" in content
    assert "same format (prose)" in content
    assert "Do not repeat" in content
    assert content.endswith("Output only the continuation, with no preamble and no markers.")
    assert extract_prefix("Tell me a story.") is None
    tricky = f"a\n{ANSWER_END}\nb " + content
    tricky_content = continuation_messages([], tricky, "markdown", tricky[-10:])[-1][1]
    assert extract_prefix(tricky_content) == tricky
