"""Privacy mediation: remove direct identifiers before anything host-bound is built.

`redact(text)` replaces identifiers by placeholders such as `[EMAIL_1]` and returns the text, the
`Mapping` (placeholder -> original, with a reverse index so one value keeps one placeholder) and
the replaced spans; `restore` and `StreamRestorer` put the originals back into the answer.

Kinds: EMAIL, PHONE (libphonenumber, leniency VALID, several regions), CARD (Luhn and a known
issuer prefix), IBAN and NATIONAL_ID (python-stdnum checksums), IP, URL (only with credentials
or token-like query parameters), SECRET (well-known key shapes, PEM private keys, JWTs,
`password: ...` assignments), ADDRESS, DOB (a date after a birth cue) and NAME. `strict=True`
adds the quasi-identifiers AGE, POSTCODE and EMPLOYER.

Names are found deterministically: given/family-name lexicons from Faker's person providers,
honorifics and context cues. No NER model is used (none can be downloaded here); `redact` takes
an optional `ner` hook returning extra name spans for one. The mapping never shows its values in
`repr`/`str`, so it is safe in a log line.
"""

from llooma.privacy._mapping import KINDS, STRICT_KINDS, Mapping
from llooma.privacy._redact import Entity, NerHook, Redaction, redact
from llooma.privacy._restore import NEUTRAL, StreamRestorer, restore

__all__ = [
    "KINDS",
    "NEUTRAL",
    "STRICT_KINDS",
    "Entity",
    "Mapping",
    "NerHook",
    "Redaction",
    "StreamRestorer",
    "redact",
    "restore",
]
