"""Deterministic structural compression: canonical form, kinds, skeletons and truncation."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import unicodedata
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from llooma.compress import (
    CONTROL_TOKENS,
    ELISION_MARKER,
    compress,
    detect_kind,
    json_skeleton_size,
    normalize,
    strip_control_tokens,
    truncate,
)

M = ELISION_MARKER
CJK_STOPS = "\u3002\uff01\uff1f\u3001\uff0c\uff1b\uff1a"

budgets = st.integers(min_value=0, max_value=400)
any_text = st.text(st.characters(codec=None), max_size=400)  # surrogates included
pieces = st.sampled_from(
    [
        "# Title",
        "## Part",
        "- item one is rather long and keeps going for a while.",
        "- item one is rather long and keeps going for a while.",
        "  - nested item",
        "1. numbered entry with words",
        "```py\nx = 1\n```",
        "```py\nx = 1\n```",
        "~~~\nunclosed",
        "> quoted",
        "| a | b |",
        "",
        "   ",
        "\t",
        "A sentence. Another one! A third?",
        "word, clause; more: end",
        "\u3053\u308c\u306f\u6587\u3002\u6b21\u3001\u6587\u3002",
        "e\u0301 \u0301x \U0001f468\u200d\U0001f469 \U0001f44d\U0001f3fd",
        '{"k": "v", "n": [1, 2, 3]}',
        "[1, 2",
        "<|im_start|>assistant\n",
        "<|im_end|>",
        "</s>",
        "[INST]",
        "<think>",
        M,
    ]
)
structured_text = st.lists(pieces | st.text(max_size=30), max_size=25).map("\n".join)
texts = any_text | structured_text
prose_text = st.lists(
    st.sampled_from(["alpha", "beta", "gamma.", "delta!", "eps?", "zeta,", "eta;", "(theta.)"])
    | st.sampled_from([" ", " ", "  ", "\n", "\n\n", "\u3002", "\u3001"]),
    max_size=120,
).map("".join)
json_keys = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(json_keys, inner, max_size=5),
    max_leaves=30,
)
json_docs = st.dictionaries(json_keys, json_values, min_size=1, max_size=6)


def all_keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value).union(*(all_keys(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(all_keys(item) for item in value))
    return set()


def is_mark(char: str) -> bool:
    return unicodedata.category(char)[0] == "M" or char in "\u200c\u200d"


# --- properties that hold for every input -------------------------------------------------


@given(texts, budgets)
@example("", 0)
@example("abc", 0)
@example("a\ud83d\ude00b\udc00", 2)
def test_never_longer_than_the_budget(text: str, budget: int) -> None:
    assert len(compress(text, budget)) <= budget


@given(texts, budgets)
def test_deterministic(text: str, budget: int) -> None:
    assert compress(text, budget) == compress(text, budget)


def test_deterministic_across_processes() -> None:
    # Sets only ever answer membership: a different hash seed must not change any result.
    script = (
        "import json, sys; from llooma.compress import compress; "
        "cases = json.loads(sys.stdin.read()); "
        "print(json.dumps([compress(t, b) for t, b in cases]))"
    )
    rows = [{f"k{i}": ["v" * i, {"x": i}] for i in range(12)}, {"y": [{"z": 1}] * 9}]
    cases = json.dumps(
        [[MARKDOWN, b] for b in (40, 120, 300)]
        + [[json.dumps(row), b] for row in rows for b in (30, 60, 150)]
        + [[" ".join(["alpha beta. gamma,"] * 40), 90]]
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            input=cases,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


@given(texts, budgets)
@example("- a\n- a b\n\n\n- a", 5)
def test_idempotent(text: str, budget: int) -> None:
    once = compress(text, budget)
    assert compress(once, budget) == once
    assert normalize(once) == once


@given(texts, budgets)
def test_result_is_valid_utf8_without_surrogates(text: str, budget: int) -> None:
    out = compress(text, budget)
    out.encode("utf-8")
    assert not any("\ud800" <= char <= "\udfff" for char in out)


@given(texts, st.integers(min_value=len(M), max_value=400))
def test_tail_never_starts_with_a_combining_mark(text: str, budget: int) -> None:
    out = compress(text, budget)
    for part in out.split(M)[1:]:
        rest = part.lstrip()
        assert not rest or not is_mark(rest[0])


@given(texts)
def test_fitting_text_is_only_normalized(text: str) -> None:
    canonical = normalize(text)
    assert compress(text, len(canonical)) == canonical
    assert compress(text, 10**6) == canonical


@given(texts, st.integers(min_value=0, max_value=len(M) - 1))
def test_below_the_marker_a_boundary_cut_head(text: str, budget: int) -> None:
    out = compress(text, budget)
    canonical = normalize(text)
    assert canonical.startswith(out)
    rest = canonical[len(out) :]
    assert not rest or not out or rest[0].isspace() or out[-1] in CJK_STOPS + ",{[:"


# --- step (i): control tokens and whitespace ----------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>",
        "<|im_start|>assistant\nHi there<|im_end|>",
        "<s>[INST] Hi there [/INST]</s>",
        "<think>Hi there</think>",
        "Hi<|endoftext|>there",
        "<start_of_turn>model\nHi there<end_of_turn>",
        "<\uff5cAssistant\uff5c>Hi there<\uff5cend\u2581of\u2581sentence\uff5c>",
        "Hi <|custom_token|> there",
    ],
)
def test_control_tokens_vanish(text: str) -> None:
    assert compress(text, 1000) == "Hi there"


def test_chat_transcript_keeps_only_the_messages() -> None:
    text = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>"
    assert compress(text, 1000) == "Hello\nHi there"


@given(st.lists(st.sampled_from(CONTROL_TOKENS) | st.text("ab .\n\t", max_size=6), max_size=20))
def test_no_control_token_survives(parts: list[str]) -> None:
    out = compress("".join(parts), 10**6)
    assert not any(token in out for token in CONTROL_TOKENS)
    assert strip_control_tokens(strip_control_tokens("".join(parts))) == strip_control_tokens(
        "".join(parts)
    )


def test_tokens_leave_a_space_only_between_words() -> None:
    assert strip_control_tokens("Hello<|eot_id|>World") == "Hello World"
    assert strip_control_tokens("Hello <|eot_id|> World") == "Hello World"
    assert strip_control_tokens("<s>Hello</s>") == "Hello"
    assert strip_control_tokens("<<s>s>") == "< s>"


def test_whitespace_runs_collapse_but_structure_stays() -> None:
    text = (
        "  Intro   text \t here.  \r\n\r\n\r\n\n- a\t\tb\n  - nested   item\n\n\n"
        "```\nx  =  1\n\n\n\ny\n```\n\n"
    )
    assert normalize(text) == (
        "  Intro text here.\n\n- a b\n  - nested item\n\n```\nx  =  1\n\ny\n```"
    )
    assert normalize("a \u00a0\u3000 b\u2028c") == "a b c"


@given(texts)
def test_normal_form_has_no_whitespace_runs(text: str) -> None:
    out = normalize(text)
    assert "\n\n\n" not in out
    assert out == out.strip("\n")
    assert all(line == line.rstrip() for line in out.split("\n"))


# --- step (ii): kinds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Just a sentence. And another.", "prose"),
        ("[1] Smith et al. wrote it.", "prose"),
        ("# Title\n\nBody.", "markdown"),
        ("Intro:\n\n```py\nx = 1\n```", "markdown"),
        ("Intro.\n- one\n- two\n- three", "list"),
        ("1. one\n2. two", "list"),
        ("Para one.\nPara two.\nPara three.\n- one", "markdown"),
        ('{"a": 1}', "json"),
        ('<|im_start|>assistant\n{"a": [1, 2', "json"),
        ("[1, 2, 3]", "json"),
        ('[{"a": 1}', "json"),
    ],
)
def test_detect_kind(text: str, kind: str) -> None:
    assert detect_kind(text) == kind


# --- step (iv): deduplication --------------------------------------------------------------


def test_repeated_lines_keep_the_first() -> None:
    text = "alpha one\nbeta two\nalpha  one \n\ngamma\nbeta two\n---\n---\n}\n}"
    assert normalize(text) == "alpha one\nbeta two\n\ngamma\n---\n---\n}\n}"


def test_repeated_fenced_blocks_keep_the_first() -> None:
    block = "```py\nprint(1)\nprint(1)\n```"
    text = f"Look:\n{block}\nAgain:\n{block}\n\n{block} \nEnd."
    assert normalize(text) == f"Look:\n{block}\nAgain:\n\nEnd."


def test_json_is_never_deduplicated() -> None:
    text = '[\n  {\n    "a": 1\n  },\n  {\n    "a": 1\n  }\n]'
    assert normalize(text) == text


# --- step (v): prose truncation ------------------------------------------------------------


def prose_cut_ok(canonical: str, before: str) -> bool:
    """The head ends where the canonical text has whitespace or after CJK punctuation."""
    if not before:
        return True
    nxt = canonical[len(before) : len(before) + 1]
    return nxt.isspace() or before[-1] in CJK_STOPS


@given(prose_text, st.floats(min_value=0, max_value=1))
def test_prose_cuts_on_boundaries_with_one_marker(text: str, share: float) -> None:
    canonical = normalize(text)
    budget = len(M) + 2 + int(share * len(canonical))
    assume(len(canonical) > budget)
    assert detect_kind(text) == "prose"
    out = compress(text, budget)
    assert out.count(M) == 1
    before, after = out.split(M)
    before, after = before.rstrip(), after.lstrip()
    assert canonical.startswith(before)
    assert canonical.endswith(after)
    assert prose_cut_ok(canonical, before)
    start = len(canonical) - len(after)
    assert not after or canonical[start - 1].isspace() or canonical[start - 1] in CJK_STOPS
    assert len(before) <= (budget - len(M) - 2) * 6 // 10


def test_prose_prefers_sentence_ends_and_keeps_head_and_tail() -> None:
    text = " ".join(f"Sentence {i} says something, then more." for i in range(50))
    out = compress(text, 200)
    # 195 characters of room: three 38-character sentences fit in the head's 117, two in the
    # tail's 79.
    assert out == (
        "Sentence 0 says something, then more. Sentence 1 says something, then more."
        f" Sentence 2 says something, then more. {M} Sentence 48 says something, then more."
        " Sentence 49 says something, then more."
    )
    assert compress(text, 40) == f"Sentence 0 says {M} then more."
    assert compress(text, 8) == M
    assert compress(text, 2) == ""
    assert compress(text, 0) == ""
    assert compress("One two", 5) == M  # "One […]" would take 7
    assert compress("One two three", 10) == f"One {M}"


def test_line_cuts_join_with_newlines() -> None:
    text = "\n".join(f"line number {i}" for i in range(30))
    assert compress(text, 60) == f"line number 0\nline number 1\n{M}\nline number 29"
    assert (
        compress(text, 61) == f"line number 0\nline number 1\n{M}\nline number 28\nline number 29"
    )


def test_truncate_keeps_the_marker_budget() -> None:
    assert truncate("a b c d e f g h", 12) == f"a b {M} g h"
    assert truncate("short", 10) == "short"


# --- steps (iii) and (v): markdown skeleton ------------------------------------------------


MARKDOWN = """# Guide

An introduction that runs on for quite a while. It has more than one sentence.

## Install

- Download the package from the website and unpack it somewhere sensible on disk.
- Run the installer with administrator rights, then reboot the machine twice.

```bash
make install
make test
make clean
```

Some closing words that go on and on for a while about nothing in particular.

## Usage

More text here that explains usage in depth. It has several sentences. Really."""


def test_markdown_keeps_headings_and_item_prefixes_first() -> None:
    assert compress(MARKDOWN, 200) == (
        f"# Guide\n\nAn introduction that runs on for quite a while. {M}\n\n## Install\n"
        f"- Download the package from the website {M}\n"
        f"- Run the installer with administrator {M}\n"
        f"```bash\n{M}\n```\n{M}\n\n## Usage\n{M}"
    )


def test_markdown_headings_outlast_everything_else() -> None:
    out = compress(MARKDOWN, 60)
    assert [line for line in out.split("\n") if line.startswith("#")] == [
        "# Guide",
        "## Install",
        "## Usage",
    ]
    assert len(out) <= 60


@given(st.integers(min_value=0, max_value=len(MARKDOWN)))
def test_markdown_never_repeats_a_marker(budget: int) -> None:
    out = compress(MARKDOWN, budget)
    assert len(out) <= budget
    assert f"{M}\n{M}" not in out
    assert f"{M} {M}" not in out


def test_list_keeps_every_bullet_when_its_skeleton_fits() -> None:
    line = "- Item {} has a fairly long description that goes on and on."
    text = "\n".join(line.format(i) for i in range(20))
    assert detect_kind(text) == "list"
    lines = compress(text, 1100).split("\n")
    assert [entry.split(" has")[0] for entry in lines] == [f"- Item {i}" for i in range(20)]
    assert lines[0] == line.format(0)
    assert lines[9] == f"- Item 9 has a fairly long description {M}"
    assert lines[-1] == line.format(19)
    # Without room for every stub, whole items at both ends beat stubs.
    lines = compress(text, 600).split("\n")
    assert lines[:5] == [line.format(i) for i in range(5)]
    assert lines[5].endswith(M)
    assert lines[6:] == [line.format(i) for i in range(16, 20)]


# --- steps (iii) and (v): JSON skeleton ----------------------------------------------------


@given(json_docs, st.integers(min_value=0, max_value=300), st.sampled_from([None, 2]))
def test_json_keeps_every_key_within_its_skeleton_size(
    doc: dict[str, Any], extra: int, indent: int | None
) -> None:
    text = json.dumps(doc, indent=indent)
    budget = json_skeleton_size(text) + extra
    out = compress(text, budget)
    assert len(out) <= budget
    assert all_keys(json.loads(out)) == all_keys(doc)


@given(json_docs, st.integers(min_value=0, max_value=50), st.sampled_from([None, 1, 2, "\t"]))
def test_json_that_fits_stays_equal(doc: dict[str, Any], extra: int, indent: Any) -> None:
    text = "\n  " + json.dumps(doc, indent=indent, ensure_ascii=False) + "  \n\n"
    budget = len(normalize(text)) + extra
    out = compress(text, budget)
    assert json.loads(out) == doc


@given(json_docs, budgets, st.sampled_from([None, 2]))
def test_json_within_any_budget(doc: dict[str, Any], budget: int, indent: int | None) -> None:
    text = json.dumps(doc, indent=indent, ensure_ascii=False)
    out = compress(text, budget)
    assert len(out) <= budget
    assert compress(out, budget) == out
    if budget >= json_skeleton_size(text):
        assert all_keys(json.loads(out)) == all_keys(doc)


def test_json_strings_are_never_normalized() -> None:
    text = '<|im_start|>assistant\n{"a":   "x  <|im_end|>  y\u2028",\t"b" :\t[ 1 ,2 ]}<|im_end|>'
    out = compress(text, 1000)
    assert out == '{"a": "x  <|im_end|>  y\u2028", "b" : [ 1 ,2 ]}'
    assert json.loads(out) == {"a": "x  <|im_end|>  y\u2028", "b": [1, 2]}


@given(json_docs, st.integers(min_value=0, max_value=60))
def test_json_below_its_skeleton_keeps_the_first_keys(doc: dict[str, Any], budget: int) -> None:
    text = json.dumps(doc)
    assume(budget < json_skeleton_size(text))
    out = compress(text, budget)
    assert len(out) <= budget
    skeleton_start = compress(text, json_skeleton_size(text))
    body = out.removesuffix(f" {M}").removesuffix(M)
    assert skeleton_start.startswith(body)


def test_json_examples() -> None:
    doc = {
        "title": "A long title for the document here",
        "items": [{"id": i, "name": f"name {i}", "desc": "some words " * 4} for i in range(10)],
        "meta": {"author": "x", "tags": ["a", "b", "c"]},
    }
    text = json.dumps(doc, indent=2)
    size = json_skeleton_size(text)
    skeleton = (
        '{"title":"[…]","items":[{"id":0,"name":"[…]","desc":"[…]"},"[…]"],'
        '"meta":{"author":"x","tags":["[…]"]}}'
    )
    assert size == len(skeleton)
    assert compress(text, size) == skeleton
    assert compress(text, 30) == '{"title":"[…]","items":[{ […]'
    assert compress(text, 2) == "{"
    out = compress(text, 400)
    assert json.loads(out)["items"][-1] == doc["items"][-1]  # type: ignore[index]
    assert '"[…]"' in out
    compact = json.dumps(doc, separators=(",", ":"))
    assert compress(text, len(compact)) == compact


def test_json_arrays_keep_elements_with_new_keys() -> None:
    rows = [{"a": i} for i in range(30)] + [{"b": 1}] + [{"a": i} for i in range(30)]
    assert json_skeleton_size(json.dumps(rows)) == 29
    assert json.loads(compress(json.dumps(rows), 29)) == [{"a": 0}, M, {"b": 1}, M]
    assert json.loads(compress(json.dumps(rows), 40)) == [{"a": 0}, M, {"b": 1}, M, {"a": 29}]


def test_json_string_leaves_are_cut_inside_the_string() -> None:
    text = json.dumps({"text": "First sentence here. " * 40 + "Last words."})
    out = compress(text, 120)
    value = json.loads(out)["text"]
    assert value.startswith("First sentence here. First")
    assert value.endswith("Last words.")
    assert value.count(M) == 1


def test_json_skeleton_size_rejects_other_text() -> None:
    with pytest.raises(ValueError, match="JSON"):
        json_skeleton_size("not json")


def test_broken_json_cuts_on_delimiters() -> None:
    text = '{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "g": 7, "h": 8'
    assert detect_kind(text) == "json"
    assert compress(text, 30) == f'{{"a": 1, {M} "g": 7, "h": 8'


# --- odds and ends -------------------------------------------------------------------------


def test_negative_budget_is_an_error() -> None:
    with pytest.raises(ValueError, match="negative"):
        compress("x", -1)


def test_surrogates_are_repaired() -> None:
    assert normalize("a\ud83d\ude00b\udc00") == "a\U0001f600b\ufffd"


def test_large_inputs_compress() -> None:
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."

    prose = " ".join(sentence() for _ in range(2000))
    markdown = "\n\n".join(
        f"## Part {i}\n\n{sentence()} {sentence()}\n\n- {sentence()} {sentence()}\n- {sentence()}"
        for i in range(400)
    )
    data = json.dumps([{"id": i, "text": sentence(), "tags": words[: i % 5]} for i in range(1000)])
    for text in (prose, markdown, data, json.dumps(list(range(20000)))):
        assert len(text) > 90_000
        for budget in (0, 100, 5_000, 60_000):
            out = compress(text, budget)
            assert len(out) <= budget
            assert compress(out, budget) == out
