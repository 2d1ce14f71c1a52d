"""Deterministic person-name detector: Faker name lexicons, honorifics and context cues.

The lexicons hold the given and family names of every locale Faker ships a person provider for.
Scripts without letter case (Arabic, Hebrew, the Indic scripts, Thai, CJK, Georgian, Armenian)
have no capital to go by: a word in them counts as capitalised only if the lexicon knows it, and
a CJK or Hangul run that is exactly a known family name then a known given name is a name.

Its size (~570 lines): one detector whose rules (lexicons, honorifics, cues, scripts) are
read together when tuning recall against precision.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Literal, NamedTuple

from llooma.privacy._words import (
    AMBIGUOUS_GIVEN,
    HONORIFICS,
    MONTHS,
    PARTICLES,
    PLACES,
    WEAK_HONORIFICS,
    WEEKDAYS,
    common_words,
    word_set,
)

MAX_NAME_WORDS = 5


def _mark_class() -> str:
    """A character class of the combining marks of the Basic Multilingual Plane."""
    ranges: list[list[int]] = []
    for code in range(0x300, 0x10000):
        if unicodedata.category(chr(code)).startswith("M"):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges) + "\\u200c\\u200d"


# Vowel signs of the Indic scripts are marks, not letters: a word goes on through them.
_LETTERS = rf"[^\W\d_](?:[^\W\d_]|[{_mark_class()}])*"
# An apostrophe inside a name, not a possessive 's; Uzbek writes "Ulug\u2018bek" with U+2018.
_APOSTROPHE = r"['\u2019\u2018\u02bb](?!s\b)"
_PIECE = rf"{_LETTERS}(?:{_APOSTROPHE}{_LETTERS})*"
_WORD = re.compile(rf"{_PIECE}(?:-{_PIECE})*")
# The same for ASCII text (most prompts), where a letter is [A-Za-z]: without the marks, and
# with a plain class the regex engine skips to the next letter by (marks cost a third before).
_ASCII_PIECE = r"[A-Za-z]+(?:['](?!s\b)[A-Za-z]+)*"
_ASCII_WORD = re.compile(rf"{_ASCII_PIECE}(?:-{_ASCII_PIECE})*")


def _words(text: str) -> re.Pattern[str]:
    return _ASCII_WORD if text.isascii() else _WORD


_SPLIT = re.compile(r"[\s,\-]+")
_INNER_CAPS = re.compile(r"^(?:Mc|Mac|O['\u2019]|D['\u2019]|De|Di|Da|Du|La|Le|Van|Von)[A-Z]")
_FUNCTION_WORDS = word_set(
    "the a an and or but of in on at to for with from by as is are was were be been this that",
    "these those it its he she we they you i my our your his her their me us him them there here",
    "what which who how why where when all any some no not every each please hello hi dear thanks",
    "thank yours sincerely regards best cheers team everyone sir madam",
)
_OPENERS = " \t\"'\u201c\u2018([*-\u2022>#"
_HONORIFIC = re.compile(
    r"(?<![\w./])(?:"
    + "|".join(re.escape(h) for h in sorted({*HONORIFICS, "M."}, key=len, reverse=True))
    + r")(?=[ \t]+[^\W\d_])"
)
_STRONG_CUES = (
    r"my\s+name\s+is",
    r"my\s+name['\u2019]s",
    r"dear",
    r"hi",
    r"hello",
    r"hey",
    r"(?:kind\s+|best\s+|warm\s+)?regards\s*,",
    r"sincerely\s*,",
    r"cheers\s*,",
    r"best\s*,",
    r"thanks\s*,",
    r"thank\s+you\s*,",
    r"yours(?:\s+truly|\s+faithfully|\s+sincerely)?\s*,",
    r"mein\s+name\s+ist",
    r"ich\s+hei(?:ß|ss)e",
    r"je\s+m['\u2019]appelle",
    r"me\s+llamo",
    r"mi\s+chiamo",
    r"meu\s+nome\s+é",
    r"mijn\s+naam\s+is",
)
# Labels of a form, header or file: often followed by something that is not a person.
_FIELD_CUES = (
    r"(?:full\s+)?name\s*:",
    r"signed\s*(?:by)?\s*[:,]?",
    r"(?:from|to|cc|attn)\s*:",
    r"patient\s*:?",
    r"author\s*:",
)
_WEAK_CUES = (
    r"i\s+am",
    r"i['\u2019]m",
    r"called",
    r"named",
    r"this\s+is",
    r"contact",
    r"ask\s+for",
    r"speak\s+(?:to|with)",
    r"talk\s+to",
    r"meet",
    r"met",
    r"my\s+(?:daughter|son|wife|husband|partner|friend|colleague|boss|manager|mother|father|mom"
    r"|mum|dad|brother|sister|neighbou?r|landlord|landlady|doctor|teacher|cousin|uncle|aunt"
    r"|girlfriend|boyfriend|fianc[ée]e?|child|kid|grandson|granddaughter|grandmother|grandfather)",
)
# Self-introductions, after which a lower-case name ("my name is john smith") is still a name.
_INTRODUCTION = re.compile(
    r"(?i)(?<![\w])(?:my\s+name\s+is|my\s+name['\u2019]s|i\s+am\s+called|mein\s+name\s+ist"
    r"|ich\s+hei(?:ß|ss)e|je\s+m['\u2019]appelle|me\s+llamo|mi\s+chiamo|meu\s+nome\s+é"
    r"|mijn\s+naam\s+is)[ \t]+"
)
_CUE = re.compile(
    r"(?i)(?<![\w])(?:(?P<strong>"
    + "|".join(_STRONG_CUES)
    + r")|(?P<field>"
    + "|".join(_FIELD_CUES)
    + r")|(?P<weak>"
    + "|".join(_WEAK_CUES)
    + r"))(?:[ \t]*\n?[ \t]*|[ \t]+)(?=[^\W\d_])"
)


def _lowered_twin(pattern: re.Pattern[str]) -> re.Pattern[str]:
    """`pattern`, compiled with (?i), as a case-sensitive pattern for the lowered ASCII text."""
    # On ASCII text, lower() keeps every position, so a (?i) pattern with no upper-case letter
    # finds the same spans in the lowered text without the flag, about twice as fast: sre then
    # skips an alternative on its first letter.
    source = pattern.pattern.removeprefix("(?i)")
    if not pattern.flags & re.IGNORECASE or re.search(r"[A-Z]", re.sub(r"\\.|\(\?P<", "", source)):
        raise ValueError(f"not a lower-case (?i) pattern: {source[:40]}")
    return re.compile(source)


_INTRODUCTION_LOWERED = _lowered_twin(_INTRODUCTION)
_CUE_LOWERED = _lowered_twin(_CUE)


def _finditer(
    pattern: re.Pattern[str], lowered: re.Pattern[str], doc: _Text
) -> Iterator[re.Match[str]]:
    if doc.lowered is None:
        return pattern.finditer(doc.text)
    return lowered.finditer(doc.lowered)


@dataclass(frozen=True)
class Lexicon:
    """Case-folded given names, family names and common words."""

    given: frozenset[str]
    family: frozenset[str]
    common: frozenset[str]
    # Parts allowed in a hyphenated family name ("Müller-Lüdenscheidt", "Stamrood-van").
    family_parts: frozenset[str]


def _parts(name: str) -> set[str]:
    whole = name.strip().casefold()
    return {whole, *(p for p in _SPLIT.split(whole) if p)}


# In some locale's lists, but far more often a place or a brand in English text.
_NOT_NAMES = word_set("santa san saint sankt são pepper")


@cache
def locales() -> tuple[str, ...]:
    """Every locale with a Faker person provider (deprecated aliases included)."""
    package = importlib.import_module("faker.providers.person")
    return tuple(sorted(m.name for m in pkgutil.iter_modules(package.__path__)))


def _names_of(provider: type, part: str) -> list[str]:
    """The provider's name lists of one part: "first" (given and middle names) or "last"."""
    out: list[str] = []
    for attr in dir(provider):
        if "names" not in attr or "romanized" in attr:
            continue
        is_given = attr.startswith(("first_", "middle_"))
        if (part == "first") != is_given or (part == "last" and "last_names" not in attr):
            continue
        values = getattr(provider, attr)
        if isinstance(values, (list, tuple, dict, set, frozenset)):
            out += [str(v) for v in values]
    return out


@cache
def build_lexicon(locales_: tuple[str, ...]) -> Lexicon:
    """The lexicons of `locales_` (every Faker person locale for `lexicon()`)."""
    given: set[str] = set()
    family: set[str] = set()
    for locale in locales_:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated locales warn on import
            provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        for name in _names_of(provider, "first"):
            given |= _parts(name)
        for name in _names_of(provider, "last"):
            family |= _parts(name)
    family -= PARTICLES | _NOT_NAMES
    given -= PARTICLES | _NOT_NAMES
    return Lexicon(
        frozenset(given),
        frozenset(family),
        common_words(),
        frozenset(given | family | PARTICLES),
    )


def lexicon() -> Lexicon:
    """Built once from Faker's person providers of every locale (no download, no model)."""
    return build_lexicon(locales())


def caseless(word: str) -> bool:
    """A word of a script without letter case (or, like Georgian, without capitals in use)."""
    if word.isascii():
        return False  # the fast path: Latin letters have case
    return not any(c.isupper() or (c.islower() and c.title() != c) for c in word)


_FUSED = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]{2,5}")


def _bare(word: str) -> str:
    """`word` without the Hindi and Marathi honorific suffix "ji" (जी)."""
    return word[:-2] if word.endswith("\u091c\u0940") and len(word) > 3 else word


class _Tok(NamedTuple):
    start: int
    end: int
    text: str
    low: str  # casefolded once: the rules look it up many times per token


class _Text:
    """Tokens of one text with the predicates the rules share."""

    def __init__(self, text: str, lex: Lexicon) -> None:
        self.text = text
        self.lex = lex
        self.toks = [
            _Tok(m.start(), m.end(), word := m.group(), word.casefold())
            for m in _words(text).finditer(text)
        ]
        self.index = {t.start: i for i, t in enumerate(self.toks)}
        self.lowered = text.lower() if text.isascii() else None

    def capitalised(self, tok: _Tok) -> bool:
        word = tok.text
        if caseless(word):
            return self.given(tok) or self.family(tok)
        if not word[0].isupper() or (len(word) > 1 and word.isupper()):
            return False
        return all(
            not (part and part[0].isupper() and any(c.isupper() for c in part[1:]))
            or _INNER_CAPS.match(part)
            for part in word.split("-")
        )

    def in_code(self, tok: _Tok) -> bool:
        text = self.text
        before = text[tok.start - 1] if tok.start else ""
        after = text[tok.end] if tok.end < len(text) else ""
        after2 = text[tok.end + 1] if tok.end + 1 < len(text) else ""
        if before and (before.isalnum() or before in "._$@#/\\`"):
            return True
        if after and (after.isalnum() or after in "_(`<[{=@"):
            return True
        return after in ".:" and after2 not in ("", " ", "\n", "\t", "\r", ")", '"', "'")

    def sentence_start(self, tok: _Tok) -> bool:
        i = tok.start - 1
        while i >= 0 and self.text[i] in _OPENERS:
            i -= 1
        return i < 0 or self.text[i] in ".!?\n:;\u2026"

    def given(self, tok: _Tok) -> bool:
        low = _bare(tok.low)
        return low in self.lex.given or (
            "-" in low and all(p in self.lex.given for p in low.split("-"))
        )

    def family(self, tok: _Tok) -> bool:
        low = _bare(tok.low)
        if low in self.lex.family:
            return True
        if low.endswith("n\u00e9") and low[:-2] in self.lex.given | self.lex.family:
            return True  # Hungarian married names: "Zolt\u00e1nn\u00e9", "Farkasn\u00e9"
        return "-" in low and all(p in self.lex.family_parts for p in low.split("-"))

    def common(self, tok: _Tok) -> bool:
        low = tok.low
        if low in self.lex.common or low in _FUNCTION_WORDS:
            return True
        if low.endswith("ing") and len(low) > 5:
            return True  # gerunds ("Hiring Manager"); "Manning" is caught by the lexicon first
        # Inflected forms of common words: "Booked", "Writers".
        for suffix in ("ed", "ers", "er"):
            stem = low.removesuffix(suffix)
            if stem != low and len(stem) > 2:
                doubled = stem[:-1] if len(stem) > 3 and stem[-1] == stem[-2] else stem
                if {stem, stem + "e", doubled} & self.lex.common:
                    return True
        return False

    def place_or_date(self, tok: _Tok) -> bool:
        return tok.low in PLACES or tok.low in MONTHS or tok.low in WEEKDAYS

    def ambiguous(self, tok: _Tok) -> bool:
        if self.place_or_date(tok):
            return True
        return self.sentence_start(tok) and (self.common(tok) or tok.low in AMBIGUOUS_GIVEN)

    def initial(self, tok: _Tok) -> bool:
        return len(tok.text) == 1 and tok.text.isupper() and self.text[tok.end : tok.end + 1] == "."

    def joined(self, left: _Tok, right: _Tok) -> bool:
        gap = self.text[left.end : right.start]
        return gap == " " or (gap == ". " and self.initial(left))

    def namelike(self, tok: _Tok) -> bool:
        """A capitalised word that may continue a name."""
        if not self.capitalised(tok) or self.in_code(tok) or tok.low in _FUNCTION_WORDS:
            return False
        if self.given(tok) or self.family(tok) or self.initial(tok):
            return tok.low not in MONTHS and tok.low not in WEEKDAYS
        return not self.common(tok) and tok.low not in PLACES

    def surname(self, tok: _Tok, *, strict: bool) -> bool:
        """Whether a capitalised word can end a name; strict after an ambiguous first word."""
        if not self.capitalised(tok) or self.in_code(tok) or self.initial(tok):
            return False
        if tok.low in MONTHS or tok.low in WEEKDAYS:
            return False
        place = tok.low in PLACES
        if strict:
            return self.family(tok) and not self.common(tok) and not place
        # After an unambiguous given name a place may be a family name ("Pedro Lima").
        return self.family(tok) or not (self.common(tok) or place)

    def extend(self, first: int, *, strict_last: bool) -> int:
        """Index of the last token of the longest name starting at `first` (or `first`)."""
        best = first
        words = 1
        k = first
        while k + 1 < len(self.toks) and words < MAX_NAME_WORDS:
            nxt = self.toks[k + 1]
            if not self.joined(self.toks[k], nxt):
                break
            if nxt.text in PARTICLES or (nxt.low in PARTICLES and self.capitalised(nxt)):
                k += 1
                continue
            if not self.namelike(nxt):
                break
            k += 1
            words += 1
            if self.surname(nxt, strict=strict_last):
                best = k
        return best


def _lexical(doc: _Text) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    i = 0
    toks = doc.toks
    while i < len(toks):
        tok = toks[i]
        if not tok.text[0].isupper() and not caseless(tok.text):
            # Most words: neither capitalised nor caseless, so no rule below can take them.
            i += 1
            continue
        given = doc.given(tok)
        if (given or tok.low in AMBIGUOUS_GIVEN) and doc.capitalised(tok) and not doc.in_code(tok):
            end = doc.extend(i, strict_last=doc.ambiguous(tok) or not given)
            if end > i:
                spans.append((tok.start, toks[end].end))
                i = end + 1
                continue
        elif doc.capitalised(tok) and doc.family(tok) and _unmarked(doc, tok):
            # Family name first: East Asian and Hungarian order ("Kiss Farkas Erika"), and
            # "Surname, Given" lists.
            j = i + 1
            while j < len(toks) and j - i < 3:
                nxt = toks[j]
                gap = doc.text[toks[j - 1].end : nxt.start]
                if gap not in (" ", ", ") or not doc.capitalised(nxt) or not _unmarked(doc, nxt):
                    break
                if doc.given(nxt):
                    end = doc.extend(j, strict_last=False)
                    spans.append((tok.start, toks[end].end))
                    break
                if gap != " " or not doc.family(nxt):
                    break
                j += 1
            if spans and spans[-1][0] == tok.start:
                i = doc.index[spans[-1][0]]
                while i < len(toks) and toks[i].end <= spans[-1][1]:
                    i += 1
                continue
        if _lone_caseless(doc, i):
            spans.append((tok.start, tok.end))
        i += 1
    return spans


def _lone_caseless(doc: _Text, i: int) -> bool:
    """A known name in a caseless script alone among words of another script ("Thanks, சஜனி")."""
    tok = doc.toks[i]
    if not caseless(tok.text) or not (doc.given(tok) or doc.family(tok)) or doc.in_code(tok):
        return False
    neighbours = [doc.toks[k] for k in (i - 1, i + 1) if 0 <= k < len(doc.toks)]
    return not any(caseless(n.text) for n in neighbours)


def _unmarked(doc: _Text, tok: _Tok) -> bool:
    """Neither code, nor a common word, place or date: may start a family-first name."""
    return not (doc.in_code(tok) or doc.common(tok) or doc.place_or_date(tok))


# How much a context vouches for the capitalised words after it.
Cue = Literal["strong", "field", "weak", "honorific", "weak_honorific"]


def _after(doc: _Text, pos: int, cue: Cue) -> tuple[int, int] | None:
    """The name that starts at `pos` after an honorific or cue, if any."""
    i = doc.index.get(pos)
    if i is None:
        return None
    start = pos
    # A name may open with a particle: "Sr. van Praagh", "Dr de Jong".
    while (
        doc.toks[i].text in PARTICLES
        and i + 1 < len(doc.toks)
        and doc.joined(doc.toks[i], doc.toks[i + 1])
    ):
        i += 1
    tok = doc.toks[i]
    if not doc.capitalised(tok) or doc.in_code(tok) or tok.low in _FUNCTION_WORDS:
        return None
    end = doc.extend(i, strict_last=False)
    known = doc.given(tok) or doc.family(tok)
    weak = cue in ("weak", "weak_honorific")
    # "Hello London" is no name, "Thanks, Victoria" is; a family name may follow either.
    vocative = not weak and tok.low in AMBIGUOUS_GIVEN and tok.low in PLACES
    if doc.place_or_date(tok) and not (end > i and doc.family(doc.toks[end])) and not vocative:
        return None
    if weak and not known:
        return None
    if cue == "weak" and end == i and doc.common(tok):
        return None  # "contact Park", but "M. Price"
    if cue == "field" and end == i and not known:
        return None  # "name: Setup" in a workflow file, but "Name: Zsolt Nagy"
    if not weak and not known and doc.common(tok):
        return None  # "Dear Customer", "Dr. Pepper" (unless "Pepper" is a known family name)
    return start, doc.toks[end].end


def _honorifics(doc: _Text) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for m in _HONORIFIC.finditer(doc.text):
        pos = m.end()
        while True:
            while pos < len(doc.text) and doc.text[pos] in " \t":
                pos += 1
            chained = _HONORIFIC.match(doc.text, pos)
            if chained is None:
                break
            pos = chained.end()
        span = _after(doc, pos, "weak_honorific" if m.group() in WEAK_HONORIFICS else "honorific")
        if span is not None:
            spans.append(span)
    return spans


def _cues(doc: _Text) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for m in _finditer(_CUE, _CUE_LOWERED, doc):
        if _HONORIFIC.match(doc.text, m.end()):
            continue  # "Dear Dr. Smith": the honorific rule takes it
        cue: Cue = "strong" if m.group("strong") else "field" if m.group("field") else "weak"
        span = _after(doc, m.end(), cue)
        if span is not None:
            spans.append(span)
    return spans


def _propagate(
    doc: _Text, spans: list[tuple[int, int]], known: Iterable[str]
) -> list[tuple[int, int]]:
    """Later mentions of a word of a found or already mapped name ("Smith" after "John Smith")."""
    words: set[str] = set()
    for start, end in spans:
        words.update(w.group() for w in _words(doc.text).finditer(doc.text, start, end))
    for name in known:
        words.update(w.group() for w in _words(name).finditer(name))
    words = {
        w
        for w in words
        if len(w) > 1
        and w[0].isupper()
        and w.casefold() not in PARTICLES
        and w.casefold() not in doc.lex.common
        and w.casefold() not in AMBIGUOUS_GIVEN
        and w.casefold() not in PLACES
        and w.casefold() not in MONTHS
    }
    if not words:
        return []
    covered = [False] * len(doc.toks)
    for start, end in spans:
        for i, tok in enumerate(doc.toks):
            if tok.start >= start and tok.end <= end:
                covered[i] = True
    return [
        (tok.start, tok.end)
        for i, tok in enumerate(doc.toks)
        if not covered[i] and tok.text in words and not doc.in_code(tok)
    ]


def merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of overlapping spans, sorted."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _introductions(doc: _Text) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for m in _finditer(_INTRODUCTION, _INTRODUCTION_LOWERED, doc):
        first = doc.index.get(m.end())
        if first is None:
            continue
        k = first
        while k < len(doc.toks) and k - first < 3:
            tok = doc.toks[k]
            if tok.low in _FUNCTION_WORDS or not (doc.given(tok) or doc.family(tok)):
                break
            if k > first and not doc.joined(doc.toks[k - 1], tok):
                break
            k += 1
        if k > first:
            spans.append((doc.toks[first].start, doc.toks[k - 1].end))
    return spans


def _fused(doc: _Text) -> list[tuple[int, int]]:
    """CJK and Hangul names written without a space: a known family name, then a given name."""
    spans: list[tuple[int, int]] = []
    if doc.text.isascii():
        return spans  # no CJK or Hangul character
    for tok in doc.toks:
        if not _FUSED.fullmatch(tok.text):
            continue
        word = tok.text
        for cut in (1, 2):
            if word[:cut] in doc.lex.family and word[cut:] in doc.lex.given:
                spans.append((tok.start, tok.end))
                break
    return spans


def find_names(text: str, known: Iterable[str] = ()) -> list[tuple[int, int]]:
    """Spans of person names: lexicon pairs, words after honorifics or cues, later mentions."""
    doc = _Text(text, lexicon())
    found = merge(
        [*_lexical(doc), *_honorifics(doc), *_cues(doc), *_introductions(doc), *_fused(doc)]
    )
    spans = merge([*found, *_propagate(doc, found, known)])
    # Two names one space apart are one name ("Kovács Bálintné Kovács Éva"): one placeholder.
    joined: list[tuple[int, int]] = []
    for start, end in spans:
        if joined and text[joined[-1][1] : start] == " ":
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined
