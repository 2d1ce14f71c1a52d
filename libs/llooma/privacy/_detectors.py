"""Pattern detectors for direct identifiers and, in strict mode, quasi-identifiers.

Its size (~940 lines): one detector per kind of identifier, each a pattern and its
validation; they share the precision guards (code, dates, order numbers), kept in one place.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from itertools import islice, pairwise
from typing import NamedTuple
from urllib.parse import parse_qsl, urlsplit

import phonenumbers
from faker.providers.address import Provider as AddressProvider
from stdnum import iban as std_iban
from stdnum import luhn
from stdnum.br import cpf
from stdnum.de import idnr
from stdnum.es import dni, nie
from stdnum.fr import nir
from stdnum.gb import nhs
from stdnum.in_ import aadhaar
from stdnum.iso7064 import mod_97_10
from stdnum.it import codicefiscale
from stdnum.nl import bsn
from stdnum.us import ssn

from llooma.privacy import _words
from llooma.privacy._names import lexicon

_US_STATES_LIST = _words.word_seq(
    "AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ",
    "NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY PR",
)
PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "IN", "BR", "JP", "AU", "CH")

# On overlap the higher priority wins, then the longer span.
PRIORITY = {
    "URL": 101,
    "SECRET": 100,
    "PASSWORD": 92,
    "EMAIL": 90,
    "CUED_ID": 88,
    "CARD": 85,
    "IBAN": 85,
    "NATIONAL_ID": 80,
    "IP": 75,
    "DOB": 70,
    "POSTCODE": 62,
    "PHONE": 60,
    "WEAK_ID": 55,
    "ADDRESS": 50,
    "CITY_POSTCODE": 45,
    "AGE": 42,
    "EMPLOYER": 35,
    "NAME": 30,
}


class Found(NamedTuple):
    """A detected span of `text[start:end]`."""

    start: int
    end: int
    kind: str
    priority: int


def _found(start: int, end: int, kind: str, rank: str | None = None) -> Found:
    return Found(start, end, kind, PRIORITY[rank or kind])


_UPPER = "".join(c for c in map(chr, range(0x41, 0x250)) if c.isupper())
_CAP = f"[{_UPPER}]"
_NAMEWORD = rf"{_CAP}[\w'\u2019-]*\.?"


def _alternation(words: tuple[str, ...] | frozenset[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


def _before(text: str, start: int, width: int = 40) -> str:
    """The text shortly before `start` on the same line."""
    window = text[max(0, start - width) : start]
    if start > width and text[start - width - 1].isalnum():
        # Cut mid-word: the tail of "bring" is no "ring" cue.
        window = window.lstrip("".join(c for c in window[:20] if c.isalnum()))
    return window.rsplit("\n", 1)[-1]


# Keywords matched under (?i) are looked for in the lowered text: a case-insensitive regex
# search costs as much as a detector. Only these characters match an ASCII letter under (?i)
# without `str.lower` giving that letter.
_FOLDS_TO_ASCII = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s"})


def _lowered(text: str) -> str:
    return text.lower() if text.isascii() else text.translate(_FOLDS_TO_ASCII).lower()


# --- email -------------------------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![\w.+\-@/])\w[\w!#$%&'*+/=?^`{|}~.-]*"
    r"@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+(?:[^\W\d_]{2,24}|xn--[a-z0-9-]{2,59})(?![\w-])"
)


def find_emails(text: str) -> list[Found]:
    return [
        _found(m.start(), m.end(), "EMAIL")
        for m in _EMAIL.finditer(text)
        # "git@github.com:org/repo.git" is an SSH remote, not a mailbox.
        if not re.match(r":[\w~/.-]", text[m.end() : m.end() + 2])
    ]


# --- phone -------------------------------------------------------------------------------------

_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_DATE_LIKE = re.compile(r"\d{1,4}([./-])\d{1,2}\1\d{1,4}|\d{1,2}:\d{2}(?::\d{2})?")
_NOT_PHONE_CUE = re.compile(
    r"(?i)\b(?:order|invoice|inv|ref|reference|ticket|tracking|case|booking|confirmation|receipt|"
    r"serial|sku|part|model|transaction|txn|account|acct|isbn|issn|id|po|item|batch|lot|build|"
    r"version|patent|claim|policy|customer|ean|upc|gtin|barcode|meeting)\b"
    r"[\s#:.\-]*(?:no\.?|nr\.?|number|num|#|id)?[\s#:.\-]*$"
)
_PHONE_CUE = re.compile(
    r"(?i)\b(?:phone|tel|telephone|mobile|mob|cell|fax|call|ring|text|sms|whatsapp|signal|"
    r"telefon|handy|téléphone|portable|teléfono|móvil|telefono|cellulare|celular|telefoon|reach|"
    r"dial|contact|landline|hotline|helpline|phone[ \t]?number)\b"
    r"|\b(?:my|his|her|our|their|your)[ \t]+(?:new[ \t]+|direct[ \t]+)?number\b"
)
# "... is my mobile", "(cell)": a cue after the number.
_PHONE_CUE_AFTER = re.compile(
    r"(?i)[ \t]*[,(]?[ \t]*(?:is[ \t]+(?:my|his|her|our|their|the)[ \t]+)?"
    r"(?:mobile|phone|cell|landline|tel|fax|home|work|office|whatsapp|number)\b"
)
_EXTENSION = re.compile(r"(?i)[ \t]?(?:x|ext\.?|extension|#)[ \t]?\d{1,6}(?![\w])")
# North American shapes: (NXX) NXX-XXXX, NXX-NXX-XXXX, NXX.NXX.XXXX, with +1, 1- or 001-.
_NANP = re.compile(
    r"(?:(?:\+?1|001)[ \t.-]?)?(?:\([2-9]\d{2}\)[ \t]?|[2-9]\d{2}[ .-])[2-9]?\d{2}[ .-]\d{4}"
)
# A code or JSON key that names a number: "created_at": 1557044434, user_id = 4155550123.
_NUMBER_KEY = re.compile(
    r"(?i)[\w-]*(?:_at|_ts|_time|time|stamp|_id|_ms|_ns|_count|_size|_bytes|_num|seed|epoch)"
    r"[\"']?[ \t]*[:=][ \t]*[\"']?$"
)
_OPERAND_BEFORE = re.compile(r"[=+*/^\u00d7\u00f7][ \t]+$")
_OPERAND_AFTER = re.compile(r"[ \t]+[=+*/^\u00d7\u00f7][ \t]")
_INTERNATIONAL = re.compile(r"(?:\+|\(\+|\+\(|00[1-9])")
_YEAR_RANGE = re.compile(r"(?:19|20)\d\d[ \t]*[-/][ \t]*(?:19|20)\d\d")

_VALID = phonenumbers.Leniency.VALID

# A run of digits and the separators phone numbers are written with.
_DIGIT_RUN = re.compile(r"(?:\(\+|\+\(|[+(])?\d(?:[ \t().\-/]{1,3}[+(]?\d|\d)*\)?")
_DIGIT_GROUP = re.compile(r"\d+")
_SENTENCE_GAP = re.compile(r"\.[ \t]+")
_DECIMAL = re.compile(r"-?\d{1,3}\.\d{4,}(?![\d.])")


def _phone_windows(text: str) -> list[tuple[int, int]]:
    """Pieces of `text` that may hold a phone number; the matcher only ever parses these."""
    # Parsing costs tens of microseconds per candidate and region, so a list of numbers is cut
    # between two adjacent groups of six or more digits (no phone format has them) and pieces
    # with fewer than seven digits are dropped: 140 kB of numbers took 10 s before, 0.3 s now.
    windows = []
    for run in _DIGIT_RUN.finditer(text):
        start = run.start()
        for stop in _SENTENCE_GAP.finditer(text, run.start(), run.end()):
            windows.append((start, stop.start()))  # "1994-06-06. 2**64": two sentences
            start = stop.end()
        groups = list(_DIGIT_GROUP.finditer(text, start, run.end()))
        for left, right in pairwise(groups):
            if len(left.group()) >= 6 and len(right.group()) >= 6:
                windows.append((start, left.end()))
                start = right.start()
        windows.append((start, run.end()))
    return [(a, b) for a, b in windows if sum(c.isdigit() for c in text[a:b]) >= 6]


def find_phones(text: str) -> list[Found]:
    spans: dict[tuple[int, int], Found] = {}
    for a, b in _phone_windows(text):
        shaped = _shaped_phone(text, a, b)
        if shaped is not None:
            spans[shaped] = _found(*shaped, "PHONE")
            continue  # the whole window is a number: libphonenumber would find a part at best
        piece = text[a:b]
        if sum(c.isdigit() for c in piece) < 7:
            continue  # six digits make a phone number only in groups after a cue
        for region in PHONE_REGIONS:
            for m in phonenumbers.PhoneNumberMatcher(piece, region, leniency=_VALID):
                start, end = a + m.start, a + m.end
                if m.raw_string.isdigit() and len(m.raw_string) >= 13:
                    continue  # 13 bare digits and more: a timestamp or a count, not as dialled
                if _DECIMAL.match(m.raw_string):
                    continue  # "166.749585": a coordinate (a cue before it is taken above)
                if (start, end) not in spans and _plausible_phone(text, start, end):
                    spans[(start, end)] = _found(start, end, "PHONE")
    return list(spans.values())


def _real_date(raw: str) -> bool:
    """Whether a date-like "347-00-56" could be a date (no part zero, one a month)."""
    if not _DATE_LIKE.fullmatch(raw):
        return False
    parts = [p for p in re.split(r"[./:-]", raw) if p]
    return all(
        (0 < int(p) <= 31 and len(p) <= 2) or (len(p) == 4 and p[:2] in ("19", "20")) for p in parts
    ) and any(int(p) <= 12 for p in parts)


def _shaped_phone(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The span of a number written like a phone number, valid or not, or None."""
    # libphonenumber at VALID rejects numbers with unassigned area codes or odd lengths, but a
    # mistyped or made-up number in a user's text is still theirs: a phone cue before or after
    # it, an extension, an international prefix or a North American shape is enough.
    while (
        end > start
        and text[end - 1] == ")"
        and text.count("(", start, end) < text.count(")", start, end)
    ):
        end -= 1
    raw = text[start:end]
    digits = sum(c.isdigit() for c in raw)
    if not 6 <= digits <= 16 or _YEAR_RANGE.fullmatch(raw):
        return None
    extension = _EXTENSION.match(text, end)
    full_end = extension.end() if extension else end
    cued = _PHONE_CUE.search(_before(text, start, 30)) or _PHONE_CUE_AFTER.match(text, full_end)
    if not _plausible_phone(text, start, full_end, dates=not cued or _real_date(raw)):
        return None
    if _DATE_LIKE.fullmatch(raw) and not (cued and not _real_date(raw)):
        return None
    if digits == 6 and not (cued and any(c in raw for c in " -.")):
        return None  # six digits only in groups after a cue ("30 20 19" in Denmark's old plan)
    shaped = (
        extension is not None
        or _INTERNATIONAL.match(raw)
        or _NANP.fullmatch(raw)
        or (raw.startswith("(") and any(c in raw for c in " -."))
    )
    if not (cued or shaped):
        return None
    if not cued and raw.count(".") == 1 and " " not in raw:
        return None  # "3.1415926" is a decimal
    return start, full_end


_ZIP_BEFORE = re.compile(
    rf"(?:(?<![\w])(?:{'|'.join(_US_STATES_LIST)}),?|(?i:\bzip(?:[ \t]?code)?:?))[ \t]*$"
)


def _plausible_phone(text: str, start: int, end: int, *, dates: bool = True) -> bool:
    raw = text[start:end]
    if (dates and _DATE_LIKE.fullmatch(raw.strip())) or _DOTTED_QUAD.fullmatch(raw.strip()):
        return False
    if _YEAR_RANGE.match(raw) or _NUMBER_KEY.search(text, 0, start):
        return False
    if _OPERAND_BEFORE.search(text, 0, start) or _OPERAND_AFTER.match(text, end):
        return False  # "a + 4981349690000738 = b": a term of a formula
    before = text[start - 1] if start else ""
    after = text[end] if end < len(text) else ""
    if before and (before.isalnum() or before in "_#/-.@$€£¥"):
        return False
    if after and (after.isalnum() or after in "_@%/"):
        return False
    if after in ("-", ".", ",") and text[end + 1 : end + 2].isdigit():
        return False
    prefix = _before(text, start, 30)
    if _ZIP_BEFORE.search(prefix):
        return False
    return not (_NOT_PHONE_CUE.search(prefix) and not _PHONE_CUE.search(prefix))


# --- payment card ------------------------------------------------------------------------------

_CARD = re.compile(
    r"(?<![\w.,+-])(?:\d{4}([ -]?)\d{4}\1\d{4}(?:\1\d{1,4})?(?:\1\d{1,3})?"
    r"|\d{4}([ -]?)\d{6}\2\d{4,5})"
    r"(?![\w-]|[.,]\d)"
)
_CARD_CUE = re.compile(
    r"(?i)\b(?:card|cards|cc|credit|debit|visa|mastercard|master[ \t]card|amex|maestro|"
    r"discover|diners|jcb|unionpay|mir|pan|karte|kreditkarte|carte|tarjeta|cartão|cartao|carta|"
    r"kaart|kort|karta|kartu|карта|картка|كارت|کارت)\b[^\n]{0,25}$"
)
_NOT_CARD_CUE = re.compile(
    r"(?i)\b(?:order|invoice|inv|ref|reference|ticket|tracking|case|booking|confirmation|receipt|"
    r"serial|sku|part|model|transaction|txn|isbn|issn|id|po|item|batch|lot|build|version|"
    r"patent|claim|policy|customer|ean|upc|gtin|barcode|timestamp|ts|epoch|nonce|seed|hash)\b"
    r"[\s#:.\-=\"']*(?:no\.?|nr\.?|number|num|#|id)?[\s#:.\-=\"']*$"
)


def _card_brand_ok(digits: str) -> bool:
    n = len(digits)
    p2, p3, p4, p6 = int(digits[:2]), int(digits[:3]), int(digits[:4]), int(digits[:6])
    checks = (
        (digits[0] == "4", n in (13, 16, 19)),  # Visa
        (51 <= p2 <= 55 or 2221 <= p4 <= 2720, n == 16),  # Mastercard
        (p2 in (34, 37), n == 15),  # American Express
        (p4 == 6011 or 644 <= p3 <= 649 or p2 == 65 or 622126 <= p6 <= 622925, 16 <= n <= 19),
        (p2 == 35, 16 <= n <= 19),  # JCB
        (p4 in (2131, 1800), n == 15),  # JCB, legacy 15 digits
        (300 <= p3 <= 305 or p2 in (36, 38, 39) or p4 == 3095, 14 <= n <= 19),  # Diners
        (p2 in (62, 81), 16 <= n <= 19),  # UnionPay
        (p2 in (50, 56, 57, 58, 63, 67) or p4 == 604, 12 <= n <= 19),  # Maestro
        (2200 <= p4 <= 2204, n == 16),  # Mir
    )
    return any(prefix and length for prefix, length in checks)


_CODE_OR_MATHS = re.compile(r"[=(\[{<>+*/^\u00d7\u00f7-][ \t]*$")
_OPERATOR_AFTER = re.compile(r"[ \t]*(?:[=+*/^\u00d7\u00f7)\]}]|-[ \t]|[lLnNuU]\b)")


def _card_ok(text: str, m: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", m.group())
    if not 12 <= len(digits) <= 19 or not luhn.is_valid(digits):
        return False
    brand = _card_brand_ok(digits)
    if not brand and max(map(digits.count, set(digits))) >= len(digits) - 1:
        return False  # "9999 9999 9999 9995", "0000 0000 0000 0000": a placeholder number
    before = _before(text, m.start())
    if _CARD_CUE.search(before):
        return True
    if _NOT_CARD_CUE.search(before) or (
        _PHONE_CUE.search(before) and digits == m.group() and (not brand or len(digits) == 12)
    ):
        return False  # "dial 573247789007": a phone number, whatever Luhn says
    if m.group() == digits and (
        _CODE_OR_MATHS.search(before) or _OPERATOR_AFTER.match(text, m.end())
    ):
        return False  # "seed = 4539...", "x * 4539..." : a number in code or a formula
    if len(digits) == 13 and digits.startswith(("978", "979")):
        return False  # an ISBN-13
    if m.group() == digits and len(digits) == 15 and nir.is_valid(digits):
        return False  # a French social security number (its own detector names it)
    if brand or (len(digits) >= 13 and m.group() != digits):
        return True
    # A Luhn-valid run of card length whose first digit is a bank's, a merchant's or a national
    # scheme's (ISO/IEC 7812); 1 (airlines) would take every millisecond timestamp.
    return len(digits) >= 13 and digits[0] in "2345669"


def find_cards(text: str) -> list[Found]:
    # Any issuer, any length from 12 to 19: a Luhn-valid number of card length is redacted
    # unless a cue says it is something else (an EAN, an order number, a timestamp).
    return [_found(m.start(), m.end(), "CARD") for m in _CARD.finditer(text) if _card_ok(text, m)]


# --- IBAN --------------------------------------------------------------------------------------

_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]){8,30}(?![\w])")


# ISO 3166 country codes (Faker's list): an IBAN-shaped number of a country that has no IBAN
# registry entry, or of the wrong length for its country, is still an account number if its
# mod-97 check digits hold (one random string in 97 passes).
_COUNTRIES = frozenset(AddressProvider.alpha_2_country_codes)


def _iban_shaped(candidate: str) -> bool:
    compact = candidate.replace(" ", "").replace("-", "")
    if compact[:2] not in _COUNTRIES or not any(c.isdigit() for c in compact[4:]):
        return False
    if len(compact) < 15 and not compact[4:].isdigit():
        return False  # short ones (Thailand's 14) only all digits
    return 12 <= len(compact) <= 34 and mod_97_10.is_valid(compact[4:] + compact[:4])


def find_ibans(text: str) -> list[Found]:
    out = []
    for m in _IBAN.finditer(text):
        candidate = m.group()
        # A following upper-case word may have been swallowed: shorten group by group.
        cuts = (i for i in range(len(candidate) - 1, 11, -1) if candidate[i] in " -")
        ends = [len(candidate), *cuts]
        for end in ends:
            if std_iban.is_valid(candidate[:end]) or _iban_shaped(candidate[:end]):
                out.append(_found(m.start(), m.start() + end, "IBAN"))
                break
    return out


# --- national identifiers ----------------------------------------------------------------------


class _IdRule(NamedTuple):
    pattern: re.Pattern[str]
    valid: Callable[[str], bool]
    cue: re.Pattern[str] | None  # required cue before the number, if any
    weak: bool  # a bare digit run: loses to an overlapping phone unless a cue names it
    cue_keywords: tuple[str, ...] = ()  # one is in every text `cue` matches, lowered


def _ssn_shaped(number: str) -> bool:
    """An SSN or ITIN by its structure; python-stdnum's list of known invalid numbers (the
    "078-05-1120" of a wallet insert, advertising numbers) is ignored: typed in a request, it
    is still somebody's number to the host."""
    area, group, serial = number[:3], number[4:6], number[7:]
    return area not in ("000", "666") and group != "00" and serial != "0000"


def _cue(words: str) -> re.Pattern[str]:
    return re.compile(rf"(?i)(?:{words})\b[^\n]{{0,25}}$")


_ID_RULES = (
    _IdRule(re.compile(r"(?<![\w-])\d{3}([- ])\d{2}\1\d{4}(?![\w-])"), _ssn_shaped, None, False),
    _IdRule(
        re.compile(r"(?<![\w-])\d{9}(?![\w-])"),
        ssn.is_valid,
        _cue(r"\bssn|social security(?: number| no\.?)?"),
        False,
        ("ssn", "social security"),
    ),
    _IdRule(
        re.compile(
            r"(?<![\w])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
            r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![\w])"
        ),
        lambda _: True,
        None,
        False,
    ),
    _IdRule(
        re.compile(r"(?<![\w-])[1-9]\d(?: ?\d{3}){3}(?![\w-])"),
        idnr.is_valid,
        None,
        True,
    ),
    _IdRule(
        re.compile(
            r"(?<![\w-])[1278] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3}"
            r" ?\d{2}(?![\w-])"
        ),
        nir.is_valid,
        None,
        False,
    ),
    _IdRule(re.compile(r"(?<![\w-])\d{8}-?[A-Z](?![\w-])"), dni.is_valid, None, False),
    _IdRule(re.compile(r"(?<![\w-])[XYZ]-?\d{7}-?[A-Z](?![\w-])"), nie.is_valid, None, False),
    _IdRule(
        re.compile(
            r"(?<![\w])[A-Z]{6}[0-9LMNP-V]{2}[ABCDEHLMPRST][0-9LMNP-V]{2}[A-Z][0-9LMNP-V]{3}[A-Z]"
            r"(?![\w])"
        ),
        codicefiscale.is_valid,
        None,
        False,
    ),
    _IdRule(
        re.compile(r"(?<![\w-])\d{4}\.?\d{2}\.?\d{3}(?![\w-])"),
        bsn.is_valid,
        _cue(r"\bbsn|burgerservicenummer|sofinummer|sofi-nummer"),
        False,
        ("bsn", "burgerservicenummer", "sofinummer", "sofi-nummer"),
    ),
    _IdRule(
        re.compile(r"(?<![\w.-])\d{3}\.\d{3}\.\d{3}-\d{2}(?![\w-])"), cpf.is_valid, None, False
    ),
    _IdRule(
        re.compile(r"(?<![\w-])\d{11}(?![\w-])"), cpf.is_valid, _cue(r"\bcpf"), False, ("cpf",)
    ),
    _IdRule(
        re.compile(r"(?<![\w-])[2-9]\d{3} ?\d{4} ?\d{4}(?![\w-])"),
        aadhaar.is_valid,
        _cue(r"\baadhaa?r|\buid\b|\buidai"),
        False,
        ("aadhar", "aadhaar", "uid"),
    ),
    _IdRule(
        re.compile(r"(?<![\w-])\d{3}[ -]?\d{3}[ -]?\d{4}(?![\w-])"),
        nhs.is_valid,
        _cue(r"\bnhs"),
        False,
        ("nhs",),
    ),
)
_COUNTRY_CODE = re.compile(r"\+\d{1,3}[ \t]?$")  # then it is the rest of a phone number
_ANY_ID_CUE = _cue(
    r"\bssn|social security|\bnino|national insurance|\bni\b|steuer|\bidnr|"
    r"identifikationsnummer|\btin|\btax|\bnir|sécurité sociale|securite sociale|\binsee|\bdni|"
    r"\bnie|\bnif|extranjero|codice fiscale|\bbsn|burgerservicenummer|sofinummer|\bcpf|"
    r"aadhaa?r|\buid|\bnhs|\bid(?:entity)? (?:number|no)|\bpersonal id"
)


def find_national_ids(text: str) -> list[Found]:
    out = []
    lowered = _lowered(text)
    for rule in _ID_RULES:
        if rule.cue_keywords and not any(k in lowered for k in rule.cue_keywords):
            continue  # no cue, so no match of this rule: spare its pattern's search
        for m in rule.pattern.finditer(text):
            if not rule.valid(m.group()) or _COUNTRY_CODE.search(text, 0, m.start()):
                continue
            before = _before(text, m.start())
            if rule.cue is not None and not rule.cue.search(before):
                continue
            rank = "CUED_ID" if _ANY_ID_CUE.search(before) else "WEAK_ID" if rule.weak else None
            out.append(_found(m.start(), m.end(), "NATIONAL_ID", rank))
    return out


# --- IP addresses ------------------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?"
    r"(?:%[\w.]+)?(?![\w])"
)
_VERSION_CUE = re.compile(r"(?i)(?:\bv|version|release|build|\bver\.?)\s*$")


def _public_enough(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (
        address.is_loopback
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
        or address.is_link_local
    )


def find_ips(text: str) -> list[Found]:
    out = []
    for m in _IPV4.finditer(text):
        try:
            address = ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        if _public_enough(address) and not _VERSION_CUE.search(_before(text, m.start(), 12)):
            out.append(_found(m.start(), m.end(), "IP"))
    for m in _IPV6.finditer(text):
        raw = m.group()
        groups = raw.split("%", 1)[0].split(":")
        if raw.count(":") < 3 and max(len(g) for g in groups) < 4:
            continue  # "1::2" is more often a slice than an address
        if not any(c.isdigit() for c in raw):
            continue
        try:
            address6 = ipaddress.IPv6Address(raw.split("%", 1)[0])
        except ValueError:
            continue
        if _public_enough(address6):
            out.append(_found(m.start(), m.end(), "IP"))
    return out


# --- URLs with credentials ---------------------------------------------------------------------

_URL = re.compile(r"(?<![\w])[A-Za-z][A-Za-z0-9+.-]{1,15}://[^\s<>\"'`]+")
_SENSITIVE_PARAMS = _words.word_set(
    "token access_token refresh_token id_token auth_token api_key apikey api-key key sig signature",
    "x-amz-signature x-amz-credential x-amz-security-token x-goog-signature x-goog-credential",
    "password pass passwd pwd secret client_secret auth session sessionid session_id sid jwt",
    "private_token access_key secret_key code_verifier",
)
_SENSITIVE_PARAM_SUFFIXES = ("token", "secret", "password", "signature", "apikey", "api_key")


def _trim_url(url: str) -> str:
    while url and url[-1] in ".,;:!?'\"]}>":
        url = url[:-1]
    while url.endswith(")") and url.count("(") < url.count(")"):
        url = url[:-1]
    return url


def _credential_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        password = parts.password
        username = parts.username
    except ValueError:
        return False
    if password or (username and len(username) >= 20):
        return True
    for query in (parts.query, parts.fragment):
        for name, value in parse_qsl(query, keep_blank_values=True):
            low = name.lower()
            if value and (low in _SENSITIVE_PARAMS or low.endswith(_SENSITIVE_PARAM_SUFFIXES)):
                return True
    return False


def find_urls(text: str) -> list[Found]:
    out = []
    for m in _URL.finditer(text):
        url = _trim_url(m.group())
        if _credential_url(url):
            out.append(_found(m.start(), m.start() + len(url), "URL"))
    return out


# --- secrets -----------------------------------------------------------------------------------

_SECRET_SHAPES = re.compile(
    r"-----BEGIN (?P<pem>[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----[\s\S]*?-----END (?P=pem)-----"
    r"|(?<![\w-])(?:"
    r"sk-(?:proj-|ant-(?:api\d\d-|admin\d\d-)?|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,255}"
    r"|github_pat_[A-Za-z0-9_]{22,255}"
    r"|glpat-[A-Za-z0-9_-]{20,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"
    r"|xapp-[A-Za-z0-9-]{10,}"
    r"|(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_-]{35}"
    r"|(?:sk|pk|rk)_(?:live|test)_[0-9A-Za-z]{16,}"
    r"|whsec_[0-9A-Za-z]{24,}"
    r"|SG\.[\w-]{16,}\.[\w-]{16,}"
    r"|hf_[A-Za-z0-9]{30,}"
    r"|npm_[A-Za-z0-9]{36}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"
    r")(?![\w-])"
)
_ASSIGNED_SECRET = re.compile(
    r"(?i)(?<![\w-])(?:[A-Za-z0-9]+[_-])*"
    r"(?P<key>password|passwd|passphrase|pwd|secret|client[_-]?secret|api[_-]?key|apikey|"
    r"access[_-]?key|secret[_-]?key|private[_-]?key|auth[_-]?token|access[_-]?token|token|"
    r"refresh[_-]?token|credentials?|passwort|kennwort|mot de passe|contraseña)"
    r"(?P<suffix>(?:[_-][A-Za-z0-9]+)*)[\"']?[ \t]*(?P<sep>[:=]|=>|\bis\b|\bist\b|\best\b|\bes\b)"
    r"[ \t]*"
    r"(?:\"(?P<dq>[^\"\n]{4,200})\"|'(?P<sq>[^'\n]{4,200})'|(?P<bare>[^\s\"'`,;]{4,200}))"
)
_BEARER = re.compile(r"(?i)\bbearer[ \t]+(?P<bare>[A-Za-z0-9._~+/-]{16,}=*)")
_NOT_A_SECRET = _words.word_set(
    "none null nil undefined true false str string int bytes bool optional required secret",
    "password token env environ getenv config settings self value values redacted hidden masked",
    "example placeholder your_password your-password yourpassword xxxx",
)


_CODE_VALUE = re.compile(r"[()\[\]{}<>\\]|\$[{(A-Za-z_]|%[(sd]")


def _bare_secret_ok(value: str, sep: str) -> bool:
    value = value.rstrip(".")
    low = value.lower()
    if len(value) < 4 or low in _NOT_A_SECRET or low in _words.common_words():
        return False
    if _CODE_VALUE.search(value) or set(value) <= set("*x.•#-_"):
        return False
    if re.fullmatch(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+", value):
        return False  # a dotted code reference such as settings.SECRET_KEY
    if re.fullmatch(r"[A-Z][A-Z_]+", value):
        return False  # an environment variable name
    has_other = any(not (c.isalpha() or c == "_") for c in value)
    mixed = any(c.isupper() for c in value) and any(c.islower() for c in value)
    if sep.isalpha():
        return has_other
    return has_other or (mixed and len(value) >= 10)


# Key suffixes that still name the secret itself; "token_count" or "password_file" do not.
_SECRET_SUFFIXES = _words.word_set("key token secret value string")
_PASSWORD_KEYS = _words.word_set("password passwd pwd passphrase passwort kennwort contraseña")


def find_secrets(text: str) -> list[Found]:
    out = [_found(m.start(), m.end(), "SECRET") for m in _SECRET_SHAPES.finditer(text)]
    for m in _ASSIGNED_SECRET.finditer(text):
        sep = m.group("sep").lower()
        suffix = m.group("suffix").lower()
        if suffix and re.split(r"[_-]", suffix)[-1] not in _SECRET_SUFFIXES:
            continue
        bare = m.group("bare")
        if bare is not None and bare.isdigit() and m.group("key").lower() not in _PASSWORD_KEYS:
            continue  # "token_limit: 4096" is a number, "password: 123456" a (weak) password
        if m.group("bare") is not None:
            value = m.group("bare")
            if not _bare_secret_ok(value, sep):
                continue
            start = m.start("bare")
            end = start + len(value.rstrip("."))
        else:
            group = "dq" if m.group("dq") is not None else "sq"
            value = m.group(group)
            if value.lower() in _NOT_A_SECRET or "{" in value or "%s" in value:
                continue
            if sep.isalpha() and not _bare_secret_ok(value, sep):
                continue
            start, end = m.start(group), m.end(group)
        out.append(_found(start, end, "SECRET", "PASSWORD"))
    for m in _BEARER.finditer(text):
        out.append(_found(m.start("bare"), m.end("bare"), "SECRET", "PASSWORD"))
    return out


# --- postal addresses --------------------------------------------------------------------------

_EN_TYPES = _alternation(_words.EN_STREET_TYPES + _words.EN_FEATURE_TYPES)
_EN_FEATURES = frozenset(_words.EN_FEATURE_TYPES)
_EN_ADDRESS = re.compile(
    rf"(?<![\w/.:-])"  # not in "8:00-20:00 CET. Hope Street"
    rf"(?:(?:Flat|Apartment|Apt\.?|Unit|Suite|Studio)[ \t]+\d{{1,4}}[A-Za-z]?,?[ \t]+)?"
    rf"(?:H\.?[ \t]?No\.?[ \t]*)?\d{{1,5}}[A-Za-z]?(?:[-/]\d{{1,5}}[A-Za-z]?)?,?[ \t]+"
    rf"(?P<words>(?:{_NAMEWORD}[ \t]+){{1,4}}?)(?P<type>{_EN_TYPES})\b\.?"
    rf"(?:[ \t]+(?:NW|NE|SW|SE|N|S|E|W)\b)?"
    rf"(?:,?[ \t]+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Flat|Floor|Fl\.?|\#)[ \t]*\#?\d+\w?)?"
)
_GB_FLAT_ADDRESS = re.compile(
    rf"(?<![\w])(?:Flat|Apartment|Apt\.?|Unit|Suite|Studio)[ \t]+\d{{1,4}}[A-Za-z]?,?[ \t]+"
    rf"(?P<words>(?:{_NAMEWORD}[ \t]+){{1,3}}?)(?P<type>{_EN_TYPES})\b\.?"
)
_HOUSE_NUMBER = r"\d{1,4}[ \t]?[a-zA-Z]?(?:[ \t]?[-/][ \t]?\d{1,4}[a-zA-Z]?)?(?![\w]|[.,]\d)"
_COMPOUND_SUFFIXES = _alternation(_words.COMPOUND_STREET_SUFFIXES)
_COMPOUND_ADDRESS = re.compile(
    rf"(?<![\w-])(?P<street>{_CAP}[\w'\u2019.-]*?(?i:{_COMPOUND_SUFFIXES}))[ \t]+{_HOUSE_NUMBER}"
)
_SEPARATE_ADDRESS = re.compile(
    rf"(?<![\w-])(?:{_CAP}[\w'\u2019-]*[ \t]+){{1,3}}"
    rf"(?:{_alternation(_words.SEPARATE_STREET_WORDS)})[ \t]+{_HOUSE_NUMBER}"
)
_DE_PREFIX_ADDRESS = re.compile(
    rf"(?<![\w-])(?:Am|An[ \t]+der|An[ \t]+den|Auf[ \t]+dem|Auf[ \t]+der|Im|In[ \t]+der|"
    rf"In[ \t]+den|Unter[ \t]+den|Zum|Zur|Hinter[ \t]+der|Vor[ \t]+dem)[ \t]+{_CAP}[\w'\u2019-]+"
    rf"[ \t]+\d{{1,3}}[a-z]?(?![\w]|[.,]\d)"
)
_ROMANCE_CONNECTOR = r"(?:de|del|la|las|los|dos|das|do|da|di|della|delle|dello|dei|degli|e|y)"
_ROMANCE_ADDRESS = re.compile(
    rf"(?<![\w])(?:{_alternation(_words.ROMANCE_STREET_TYPES)})[ \t]+"
    rf"(?:{_ROMANCE_CONNECTOR}[ \t]+)*{_NAMEWORD}(?:[ \t]+(?:{_ROMANCE_CONNECTOR}[ \t]+)*"
    rf"{_NAMEWORD}){{0,4}},?[ \t]+(?:[nN][º°o]\.?[ \t]*)?\d{{1,4}}[A-Za-z]?(?![\w]|[.,]\d)"
    rf"(?:[ \t]+(?:Apt\.|Piso|Puerta|Appartamento|Piano|Scala|Interno|Int\.|Andar|Apto\.?|"
    rf"Sala|Bloco|Casa)[ \t]*\w{{1,4}})?"
)
_FRENCH_CONNECTOR = (
    r"(?:de[ \t]+la|de|du|des|la|le|les|l['\u2019]|d['\u2019]|aux|au|à|et|sur|sous|en)"
)
_FRENCH_ADDRESS = re.compile(
    rf"(?<![\w/.-])\d{{1,4}}(?:[ \t]?(?:bis|ter|quater|[A-Da-d]))?,?[ \t]+"
    rf"(?i:{_alternation(_words.FRENCH_STREET_TYPES)})[ \t]+"
    rf"(?:{_FRENCH_CONNECTOR}[ \t]*)*{_NAMEWORD}"
    rf"(?:[ \t]+(?:{_FRENCH_CONNECTOR}[ \t]*)*{_NAMEWORD}){{0,3}}"
)


def _en_address_ok(m: re.Match[str]) -> bool:
    words = m.group("words").split()
    if m.group("type") not in _EN_FEATURES:
        return True
    lex = lexicon()
    last = words[-1].rstrip(".").casefold()
    return last in lex.given or last in lex.family


def _compound_ok(m: re.Match[str]) -> bool:
    street = m.group("street").casefold()
    common = _words.common_words()
    if street in common or (street.endswith("ing") and street[:-3] in common):
        return False  # "Spring 2024", "Offering 5 seats"
    return len(street) >= 5


def find_addresses(text: str) -> list[Found]:
    out = []
    for pattern, ok in (
        (_EN_ADDRESS, _en_address_ok),
        (_GB_FLAT_ADDRESS, _en_address_ok),
        (_COMPOUND_ADDRESS, _compound_ok),
    ):
        out += [_found(m.start(), m.end(), "ADDRESS") for m in pattern.finditer(text) if ok(m)]
    for pattern in (_SEPARATE_ADDRESS, _DE_PREFIX_ADDRESS, _ROMANCE_ADDRESS, _FRENCH_ADDRESS):
        out += [_found(m.start(), m.end(), "ADDRESS") for m in pattern.finditer(text)]
    return [f._replace(end=f.start + len(_trim_address(text[f.start : f.end]))) for f in out]


_ABBREVIATIONS = _words.word_set(
    "St Ave Rd Blvd Ln Dr Ct Pl Sq Ter Cres Pkwy Hwy Cir Trl Str Av Avda Pza Apt Ste Fl Int Apto",
)


def _trim_address(address: str) -> str:
    address = address.rstrip(" \t,")
    last = address.rsplit(None, 1)[-1]
    # A full stop belongs to the address only when it ends an abbreviation ("Baker St.").
    if last.endswith(".") and last[:-1] not in _ABBREVIATIONS:
        address = address[:-1]
    return address


# --- dates of birth ----------------------------------------------------------------------------

_MONTH_NAMES = (
    r"jan(?:uary|\.)?|feb(?:ruary|\.)?|mar(?:ch|\.)?|apr(?:il|\.)?|may|june?|july?|aug(?:ust|\.)?|"
    r"sep(?:t(?:ember)?|\.)?|oct(?:ober|\.)?|nov(?:ember|\.)?|dec(?:ember|\.)?|"
    r"januar|februar|märz|maerz|mai|juni|juli|oktober|dezember|"
    r"janvier|février|fevrier|mars|avril|juin|juillet|août|aout|septembre|octobre|novembre|"
    r"décembre|decembre|enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre|"
    r"setiembre|octubre|noviembre|diciembre|gennaio|febbraio|aprile|maggio|giugno|luglio|"
    r"settembre|ottobre|dicembre|januari|februari|maart|mei|augustus|janeiro|fevereiro|março|"
    r"maio|junho|julho|setembro|outubro|novembro|dezembro"
)
_DATE = re.compile(
    rf"(?i)(?<![\w./-])(?:"
    rf"\d{{1,2}}[./-]\d{{1,2}}[./-](?:\d{{4}}|\d{{2}})"
    rf"|\d{{4}}[./-]\d{{1,2}}[./-]\d{{1,2}}"
    rf"|(?:{_MONTH_NAMES})[ \t]+\d{{1,2}}(?:st|nd|rd|th)?(?:,?[ \t]+\d{{4}})?"
    rf"|\d{{1,2}}(?:st|nd|rd|th|er|º|°|\.)?[ \t]+(?:of[ \t]+|de[ \t]+)?(?:{_MONTH_NAMES})"
    rf"(?:,?[ \t]+(?:de[ \t]+)?\d{{4}})?"
    rf")(?![\w]|[./-]\d)"
)
_DOB_CUE = re.compile(
    r"(?i)(?<![\w.])(?:(?:born|birth|birthday|birthdate|dob|geboren|geburtsdatum|geburtstag|"
    r"né|née|naissance|nací|nació|nacido|nacida|nacimiento|nato|nata|nascita|geboortedatum|"
    r"nascido|nascida|nascimento|cumpleaños|compleanno|anniversaire)\b|geb\.|d\.o\.b\.?)"
)
_DOB_AFTER = re.compile(r"(?i)^[\s,()]*(?:\w+[ \t]+){0,2}(?:geboren|born|nato|nata|né|née)\b")
_SENTENCE_END = re.compile(r"[.!?;]\s+[A-Z]")


def find_dobs(text: str) -> list[Found]:
    out = []
    for m in _DATE.finditer(text):
        window = _before(text, m.start(), 45)
        cues = list(_DOB_CUE.finditer(window))
        after = re.split(r"[.!?;\n]", text[m.end() : m.end() + 25], maxsplit=1)[0]
        if (cues and not _SENTENCE_END.search(window, cues[-1].end())) or _DOB_AFTER.search(after):
            out.append(_found(m.start(), m.end(), "DOB"))
    return out


# --- strict mode: quasi-identifiers ------------------------------------------------------------

_AGE = re.compile(
    r"(?i)(?<![\w.])(?:"
    r"\d{1,3}[ \t-]*(?:years?|yrs?)[ \t-]*old(?![\w])"
    r"|\d{1,3}[ \t]*(?:y/o|yo)(?![\w])"
    r"|\d{1,3}-year-old"
    r"|(?:aged|age|âge|alter|edad|età|idade|leeftijd)[ \t]*(?:[:=]|of|is)?[ \t]*\d{1,3}"
    r"(?![\w]|[.,]\d)"
    r"|\d{1,3}[ \t]+(?:ans|jahre(?:[ \t]+alt)?|años|anni|anos|jaar(?:[ \t]+oud)?)(?![\w])"
    r")"
)
_POSTCODES = re.compile(
    r"(?<![\w])(?P<uk>(?:[A-PR-UWYZ][A-HK-Y]?\d[A-Z\d]?|GIR)[ \t]?\d[ABD-HJLNP-UW-Z]{2})(?![\w])"
    rf"|(?<![\w])(?:{'|'.join(_US_STATES_LIST)}),?[ \t]+(?P<us>\d{{5}}(?:-\d{{4}})?)(?![\w-])"
    r"|(?i:\bzip(?:[ \t]?code)?|\bpostcode|\bpostal[ \t]code|\bplz|\bcode[ \t]postal|\bcp|"
    r"\bcap|\bcep)[ \t]*[:#]?[ \t]*(?P<cued>\d{5}(?:-\d{3,4})?|\d{4}[ \t]?[A-Z]{2})(?![\w-])"
    rf"|(?:^|(?<=[,\n])|(?<=,[ \t]))[ \t]*(?P<city>\d{{5}}|\d{{4}}[ \t]?[A-Z]{{2}})[ \t]+"
    rf"(?={_CAP}[\w'\u2019-]+)"
)
_EMPLOYER_CUE = re.compile(
    r"(?i)(?<![\w])(?:(?P<first>i[ \t]+work|i['\u2019]m[ \t]+working|i[ \t]+am[ \t]+working"
    r"|i[ \t]+worked|employed|i['\u2019]m[ \t]+employed|i[ \t]+am[ \t]+employed)"
    r"|works|worked|working|hired)[ \t]+(?:at|for|by|with)"
    r"|(?<![\w])(?P<role>(?:i['\u2019]m|i[ \t]+am|he['\u2019]s|she['\u2019]s|he[ \t]+is|she[ \t]+is"
    r"|we[ \t]+are|they[ \t]+are|i[ \t]+was|as)[ \t]+(?:a|an|the)[ \t]+(?:[\w-]+[ \t]+){0,3}?"
    r"(?:at|for|with)"
    r"|(?:my|his|her|their|our)[ \t]+(?:job|position|role|internship|team|colleagues?|boss|"
    r"manager|office)[ \t]+(?:at|with))"
    r"|(?<![\w])(?P<named>(?:my[ \t]+)?employer(?:[ \t]+is|[ \t]*:)"
    r"|ich[ \t]+arbeite[ \t]+bei|je[ \t]+travaille[ \t]+(?:chez|pour)|trabajo[ \t]+en"
    r"|lavoro[ \t]+(?:per|presso|da)|trabalho[ \t]+(?:na|no|em|para)|ik[ \t]+werk[ \t]+bij)"
)
_ORG_TOKEN = re.compile(r"[^\s]+")
_ORG_CONNECTORS = _words.word_set(
    "& - and und et y e of de du der den des del la le di da do dos das van von ten ter für for",
)
# Lower-case words that may end a company name ("Lucarelli e figli").
_ORG_WORDS = _words.word_set(
    "asociados associados hijos hermanos figli filhos irmãos fils frères söhne zonen cia",
)
_LEGAL = _words.word_set(
    "& gmbh kg kgaa ag se sa sas sarl sl srl spa ltd llc plc inc co corp lp llp bv nv oy ab as me",
    "ltda eireli scp com mbh ohg ug kg eg ev",
)
_ORG_ABBREVIATION = re.compile(
    r"(?:[A-Za-z]{1,4}\.){2,}|(?:Inc|Co|Ltd|Ltda|Corp|Bros|Cia|Soc|Com)\."
)


def _organisation(text: str, pos: int) -> tuple[int, int] | None:
    """The span of the organisation name starting at `pos` (capitalised words and connectors)."""
    line_end = text.find("\n", pos)
    tokens = list(_ORG_TOKEN.finditer(text, pos, len(text) if line_end < 0 else line_end))[:9]
    if tokens and tokens[0].group().casefold() == "the":
        tokens = tokens[1:]
    listed = any(t.group() in ("and", "&", "und", "et", "y", "e") for t in tokens)
    kept: list[re.Match[str]] = []
    for tok in tokens:
        word = tok.group().rstrip(",;:!?)")
        if (
            kept
            and kept[-1].group().endswith(".")
            and word.replace(".", "").casefold() not in _LEGAL
        ):
            break  # a full stop ends the name unless a legal form follows ("Co. KG")
        # Lower-case legal forms are written with dots ("s.r.l.") or are "mbH".
        dotted = ("." in word or word == "mbH") and word.replace(".", "").casefold() in _LEGAL
        capital = word[:1].isupper() or word[:1].isdigit() or dotted
        joining = word.rstrip(".").casefold() in _ORG_CONNECTORS | _ORG_WORDS
        if not (capital or (joining and (kept or word in _words.PARTICLES))):
            break
        kept.append(tok)
        if tok.group() != word and not (tok.group() == word + "," and listed):
            break  # punctuation after the word ends the name, bar the "A, B and C" form
    while kept and kept[-1].group().casefold() in _ORG_CONNECTORS:
        kept.pop()
    if not kept:
        return None
    start, end = kept[0].start(), kept[-1].end()
    name = text[start:end]
    stripped = name.rstrip(".,;:")
    last = name.rsplit(" ", 1)[-1]
    name = stripped + "." if last.endswith(".") and _ORG_ABBREVIATION.search(last) else stripped
    return start, start + len(name)


_NEXT_WORD = re.compile(r"[ \t]+([a-z]+)")
# Words that may follow "42 years old" when it is a person's age; "a 30-year-old building" is not.
_AGE_FOLLOWERS = _words.word_set(
    "man woman boy girl male female patient person child kid baby son daughter mother father mom",
    "dad wife husband brother sister student driver applicant victim suspect teen teenager adult",
    "and or but with who which from in at on is was has had will and lives living i he she they",
    "we you my his her their now today so",
)


def find_ages(text: str) -> list[Found]:
    out = []
    for m in _AGE.finditer(text):
        nxt = _NEXT_WORD.match(text, m.end())
        if m.group().lower().endswith("old") and nxt and nxt.group(1) not in _AGE_FOLLOWERS:
            continue
        out.append(_found(m.start(), m.end(), "AGE"))
    return out


def find_postcodes(text: str) -> list[Found]:
    out = []
    for m in _POSTCODES.finditer(text):
        group = next(g for g in ("uk", "us", "cued", "city") if m.group(g) is not None)
        # "10115 Berlin" is only a postcode if no address reading ("15422 Wolfe Divide") wins.
        rank = "CITY_POSTCODE" if group == "city" else None
        out.append(_found(m.start(group), m.end(group), "POSTCODE", rank))
    return out


def find_employers(text: str) -> list[Found]:
    out = []
    for cue in _EMPLOYER_CUE.finditer(text):
        span = _organisation(text, cue.end())
        if span is None:
            continue
        first = text[span[0] : span[1]].split()[0].casefold()
        # "It works for Python" is no employer; "I work at Apple" is.
        if not (cue.group("first") or cue.group("named")) and first in _words.common_words():
            continue
        out.append(_found(span[0], span[1], "EMPLOYER"))
    return out


# --- which detectors can find anything ---------------------------------------------------------

# Most prompts hold no digit, "@" or "://", so most detectors cannot match them: each detector
# goes with a necessary condition read off its patterns, checked by a literal or a one-class
# search far cheaper than the detector. `\d` is the patterns' own class (any decimal digit).
_DIGIT = re.compile(r"\d")
_TWO_DIGITS = re.compile(r"\d\d")
_CARD_OPENING = re.compile(r"\d{4}")
_IBAN_OPENING = re.compile(r"[A-Z]{2}\d\d")
# Every national-ID rule needs two adjacent digits except the codice fiscale, whose letters
# may stand for all its digits (omocodia) but which opens with six capitals.
_SIX_CAPITALS = re.compile(r"[A-Z]{6}")
# What every alternative of `_SECRET_SHAPES` holds: "_" (ghp_, github_pat_, sk_live_, whsec_,
# hf_, npm_), one of these literals, or an AWS or Google key's opening "A" and capital.
_SECRET_SHAPE_HINT = re.compile(r"_|-----BEGIN |sk-|glpat-|xox|xapp-|SG\.|eyJ|A[GIKNRS]")
# What each key of `_ASSIGNED_SECRET` and `_BEARER` holds.
_SECRET_KEYWORDS = _words.word_seq(
    "pass pwd secret key token credential kennwort contraseña bearer"
)


def _may_hold_secret(text: str, _digit: bool) -> bool:
    low = _lowered(text)
    return any(w in low for w in _SECRET_KEYWORDS) or _SECRET_SHAPE_HINT.search(text) is not None


# A date is a DOB only after a `_DOB_CUE` or before a `_DOB_AFTER` word; each holds one of these.
_DOB_KEYWORDS = _words.word_seq(
    "born birth dob d.o.b geb né nais nac nat nasc cumplea compleanno anniversaire"
)


def _may_hold_dob(text: str, digit: bool) -> bool:
    if not digit:
        return False
    low = _lowered(text)
    return any(w in low for w in _DOB_KEYWORDS)


class Detector(NamedTuple):
    find: Callable[[str], list[Found]]
    # False only when `find(text)` is certainly empty; `digit`: whether `text` has a `\d`.
    may_find: Callable[[str, bool], bool]


def _has_digits(text: str, count: int) -> bool:
    return sum(1 for _ in islice(_DIGIT.finditer(text), count)) == count


def _needs_digit(_text: str, digit: bool) -> bool:
    return digit


DETECTORS = (
    Detector(find_secrets, _may_hold_secret),
    Detector(find_urls, lambda text, _: "://" in text),
    Detector(find_emails, lambda text, _: "@" in text),
    Detector(find_cards, lambda text, digit: digit and _CARD_OPENING.search(text) is not None),
    Detector(find_ibans, lambda text, digit: digit and _IBAN_OPENING.search(text) is not None),
    Detector(
        find_national_ids,
        lambda text, digit: (
            (digit and _TWO_DIGITS.search(text) is not None)
            or _SIX_CAPITALS.search(text) is not None
        ),
    ),
    # An IPv6 address without a digit is kept only for one in its zone ("fc00::ab%eth²").
    Detector(find_ips, lambda text, digit: digit or ("%" in text and ":" in text)),
    Detector(find_dobs, _may_hold_dob),
    # A phone window holds six digits at least (its other characters are separators).
    Detector(find_phones, lambda text, digit: digit and _has_digits(text, 6)),
    Detector(find_addresses, _needs_digit),
)
STRICT_DETECTORS = (
    Detector(find_ages, _needs_digit),
    Detector(find_postcodes, _needs_digit),
    Detector(find_employers, lambda _text, _digit: True),
)


def has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None
