"""The privacy detectors' necessary conditions: skipping a detector never changes what is found.

`detect` runs a detector only when its `may_find` says the text can hold a match (a digit, an
"@", a secret's keyword...). Every text here, corpus samples with identifiers and hand-written
prose, code, numbers and Unicode, must give the same spans with those skips as with every
detector forced; a detector whose patterns stop needing what its condition looks for fails here.
Inside `find_national_ids` a rule that needs a cue is skipped when none of its keywords is in
the text, and the keyword conditions look in the lowered text for what (?i) patterns match.
"""

from __future__ import annotations

import re
import sys
from functools import cache

import pytest

from llooma.privacy import _detectors as d
from llooma.privacy import _names
from llooma.privacy._redact import detect
from tests.support.privacy_corpus import generate

HAND_WRITTEN = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Summarise the causes of the French Revolution. Mention the Estates-General and bread.",
    "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n",
    "SELECT name, email FROM users WHERE id = 42 AND created_at > '2024-01-01';",
    "The answer is 3.1415926, not 22/7; 2**64 = 18446744073709551616.",
    "Order 4111111111111111 shipped; tracking 1Z999AA10123456784.",
    "Dear Dr. Müller, mein Name ist Jürgen Groß. Grüße aus Köln!",
    "Привет, меня зовут Анна Иванова. 東京都の山田太郎です。 சஜனி",
    "Arabic-Indic digits ٠١٢٣٤٥٦٧٨٩, Devanagari ०१२३४५६७८९, fullwidth \uff10\uff11\uff12\uff13.",
    "Superscripts x² + y³ = z¹ and fractions ½ ¼ have no decimal digit.",
    "Route via fcde::abcd%eth² today.",
    "Or via 2001:db8::1 and 8.8.8.8.",
    "\u017fecret: hunter-two-X and \u212aEY=abcdefghijklmnop (a long s and a Kelvin sign).",
    "password: correct-horse-battery-staple; Authorization: Bearer abcdefghijklmnopqrstuvwx",
    "My codice fiscale is RSSMRA85T10A562S and in omocodia RSSMRATVTLMALMRS.",
    "Email me at ana@example.org or see https://user:pw@example.com/x?token=abc",
    "AKIAIOSFODNN7EXAMPLE and ghp_abcdefghijklmnopqrstuvwxyz0123456789 and eyJhbGciOi.eyJzdWIi.x",
    "I am 42 years old, I work at Globex Corporation, 10115 Berlin, zip 94103.",
    "Geburtsdatum: 03.04.1985; date de naissance 12/03/1985; nacido el 5 de mayo de 1990.",
    "SSN 123456789, BSN 111222333, CPF 12345678909, Aadhaar 2345 6789 0124, NHS 943 476 5919.",
    "UID 2345 6789 0124; social security 123-45-6789 and 123456789; sofinummer 1112.22.333.",
    "D.O.B. 1990-01-02, she was born on March 3, 1971 in Lyon; Max, 12.05.1960 geboren.",
    "",
    " ",
    "\x00\x01\n\t",
)


@cache
def texts() -> tuple[str, ...]:
    corpus = [s.text for s in generate(200, seed=18)]
    corpus += [s.text for s in generate(80, seed=19, strict=True)]
    varied = [*HAND_WRITTEN, *corpus]
    # Case changes open and close the keyword and capital conditions.
    return (*varied, *(t.upper() for t in varied[:100]), *(t.lower() for t in varied[:100]))


ALL_DETECTORS = (*d.DETECTORS, *d.STRICT_DETECTORS)


@pytest.mark.parametrize("detector", ALL_DETECTORS, ids=lambda det: det.find.__name__)
def test_a_skipped_detector_would_have_found_nothing(detector: d.Detector) -> None:
    skipped = found = 0
    for text in texts():
        if not detector.may_find(text, d.has_digit(text)):
            skipped += 1
            assert detector.find(text) == [], text
        elif detector.find(text):
            found += 1
    assert found > 0  # the texts hold what the detector finds
    if detector.find is not d.find_employers:  # the one detector that is never skipped
        assert skipped > 0


@pytest.mark.parametrize("strict", [False, True])
def test_detect_with_skips_equals_detect_with_every_detector(
    strict: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_skips = [detect(t, strict=strict, known_names=("Ana Lopez",)) for t in texts()]
    for name in ("DETECTORS", "STRICT_DETECTORS"):
        forced = tuple(det._replace(may_find=lambda *_: True) for det in getattr(d, name))
        monkeypatch.setattr(d, name, forced)
    every_detector = [detect(t, strict=strict, known_names=("Ana Lopez",)) for t in texts()]
    assert with_skips == every_detector
    assert sum(map(bool, with_skips)) > len(texts()) // 2


CUED_ID_RULES = [rule for rule in d._ID_RULES if rule.cue_keywords]
CUE_KEYWORDS = [k for rule in CUED_ID_RULES for k in rule.cue_keywords]


@pytest.mark.parametrize("rule", CUED_ID_RULES, ids=lambda rule: rule.cue_keywords[0])
def test_a_national_id_rule_skipped_for_want_of_its_cue_keyword_has_no_cue(rule: d._IdRule) -> None:
    assert rule.cue is not None
    cued = 0
    for text in texts():
        lowered = d._lowered(text)
        for m in rule.pattern.finditer(text):
            has_cue = rule.cue.search(d._before(text, m.start())) is not None
            assert any(k in lowered for k in rule.cue_keywords) or not has_cue, text
            cued += has_cue
    assert cued > 0


def test_an_ipv6_address_without_a_decimal_digit_is_still_found() -> None:
    # "²" is a digit to str.isdigit but not to \d: why find_ips also runs on "%" and ":".
    text = "Route via fcde::abcd%eth² today."
    assert not d.has_digit(text)
    assert [text[f.start : f.end] for f in d.find_ips(text)] == ["fcde::abcd%eth²"]
    ips = next(det for det in d.DETECTORS if det.find is d.find_ips)
    assert ips.may_find(text, False)


def test_keywords_are_found_in_the_lowered_text_in_any_case_the_patterns_match() -> None:
    # The keyword patterns match under (?i); the conditions look in the lowered text instead.
    keywords = (*d._SECRET_KEYWORDS, *d._DOB_KEYWORDS, *CUE_KEYWORDS)
    chars = sorted({c for word in keywords for c in word})
    any_char = re.compile("(?i)[" + "".join(map(re.escape, chars)) + "]")
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if any_char.match(char):
            matched = [c for c in chars if re.fullmatch("(?i)" + re.escape(c), char)]
            assert matched == [d._lowered(char)], hex(code)


@pytest.mark.parametrize("name", ["_CUE", "_INTRODUCTION"])
def test_a_name_cue_pattern_finds_the_same_in_lowered_ascii_text(name: str) -> None:
    pattern = getattr(_names, name)
    lowered = getattr(_names, f"{name}_LOWERED")
    extra = ("My Name Is JOHN SMITH", "DEAR Ana, THANKS, Bo", "I'M Called Ed; Ich Heisse Jo")
    ascii_texts = [t for t in (*extra, *texts()) if t.isascii()]
    matched = 0
    for text in ascii_texts:
        spans = [(m.span(), m.groupdict()) for m in pattern.finditer(text)]
        spans_lowered = [(m.span(), m.groupdict()) for m in lowered.finditer(text.lower())]
        # The groups' text differs in case only.
        assert [(s, {k: v and v.lower() for k, v in g.items()}) for s, g in spans] == spans_lowered
        matched += bool(spans)
    assert matched >= 5


def test_a_pattern_with_an_upper_case_letter_has_no_lowered_twin() -> None:
    with pytest.raises(ValueError, match="lower-case"):
        _names._lowered_twin(re.compile(r"(?i)\bdear\s+Sir"))
    with pytest.raises(ValueError, match="lower-case"):
        _names._lowered_twin(re.compile(r"dear"))
    assert _names._lowered_twin(re.compile(r"(?i)(?<![\w])dear\s+sir\W")).pattern == (
        r"(?<![\w])dear\s+sir\W"
    )
