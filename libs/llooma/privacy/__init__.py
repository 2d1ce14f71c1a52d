"""Privacy mediation: remove direct identifiers before anything host-bound is built.

`redact(text)` replaces identifiers by placeholders such as `[EMAIL_1]` and returns the text, the
`Mapping` (placeholder -> original, with a reverse index so one value keeps one placeholder) and
the replaced spans; `restore` and `StreamRestorer` put the originals back into the answer.

Kinds: EMAIL, PHONE, CARD, IBAN, NATIONAL_ID (python-stdnum checksums), IP, URL (only with
credentials or token-like query parameters), SECRET (well-known key shapes, PEM private keys,
JWTs, `password: ...` assignments), ADDRESS, DOB (a date after a birth cue) and NAME.
`strict=True` adds the quasi-identifiers AGE, POSTCODE and EMPLOYER (also after a role: "I'm a
nurse at Globex").

What looks like an identifier is redacted even when a validator calls it invalid, since a
mistyped or made-up number in a user's text is still theirs to a curious host:
- PHONE: what libphonenumber deems VALID in several regions, and any number written like a phone
  number with a phone cue before or after it, an extension (`x80508`), an international prefix
  or a North American shape (unassigned area codes included);
- CARD: a Luhn-valid number of 12 to 19 digits, any issuer, unless a cue or its place says
  otherwise (an order number, an EAN or ISBN, a term of a formula, a value in code);
- IBAN: valid per python-stdnum, or any country code with good mod-97 check digits;
- US SSN: by its structure, not by python-stdnum's list of known invalid numbers.

Names are found deterministically: given/family-name lexicons from the person providers of every
locale Faker ships, honorifics and context cues; scripts without letter case go by the lexicon.
No NER model is used (none can be downloaded here); `redact` takes an optional `ner` hook
returning extra name spans for one. The mapping never shows its values in `repr`/`str`, so it is
safe in a log line.

Restoring: a placeholder of the mapping becomes its original; one of our kinds the model made up
(`[EMAIL_2]` when the mapping holds only `[EMAIL_1]`) becomes a neutral word (`NEUTRAL`: "the
email address", "someone"), never placeholder syntax, also when a stream splits it; other
bracketed text is the model's and stays. Placeholder-like text the user typed maps to itself.
Every other character round-trips exactly, NUL and control characters included.
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
