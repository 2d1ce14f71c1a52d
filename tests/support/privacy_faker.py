"""Faker corpora: identifiers from Faker's providers in every locale that ships them.

Unlike `tests.support.privacy_corpus`, whose templates were written with the detectors, these values
come from Faker as is (every card type of every credit-card locale, every locale's IBAN, email,
phone number and person name) and are put into a few sentence shapes chosen here once, before
tuning. Seeds are split: the corpus of `TUNING_SEED` was used while the detectors were
improved, the one of `HELD_OUT_SEED` was not, and both are reported.

`python -m tests.support.privacy_faker [--per-locale N] [--show-misses N]` prints recall and
precision per kind for both splits.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import random
import re
import sys
import warnings
from collections.abc import Callable
from functools import cache

from faker import Faker

from tests.support.privacy_corpus import Evaluation, Label, Sample, evaluate, table

TUNING_SEED = 20261203
HELD_OUT_SEED = 77031  # never looked at while tuning the detectors
KINDS = ("CARD", "IBAN", "EMAIL", "PHONE", "NAME")

SHAPES: dict[str, tuple[str, ...]] = {
    "CARD": (
        "My card number is {V}.",
        "Charge it to {V}, expiry 08/29.",
        "Card: {V}",
        "Please refund {V} by Friday.",
        '{{"card": "{V}", "holder": "on file"}}',
        "Paid with {V} yesterday, it went through.",
        "{V}",
    ),
    "IBAN": (
        "IBAN: {V}",
        "Please wire the deposit to {V}.",
        "{V}",
        "Account {V} (current account)",
        '{{"iban": "{V}"}}',
        "Refunds go to {V} from now on, thanks.",
    ),
    "EMAIL": (
        "Mail me at {V}.",
        "{V}",
        "Reply to <{V}> before noon.",
        "From: Support <{V}>",
        '{{"email": "{V}"}}',
        "cc {V}, thanks",
        "The invite went to {V} yesterday.",
    ),
    "PHONE": (
        "Call me at {V}.",
        "My number is {V}, text me after six.",
        "Tel: {V}",
        "You can reach the office on {V} (mornings only).",
        "{V} is my mobile.",
        '{{"name": "front desk", "phone": "{V}"}}',
        "Contact: {V}",
        "If the line drops, dial {V} again.",
    ),
    "NAME": (
        "{V} will join the call at three.",
        "Please forward this to {V}.",
        "Dear {V},\nthank you for the update.",
        "Thanks,\n{V}",
        "My name is {V}.",
        "I had lunch with {V} yesterday.",
        "Signed: {V}",
        "The refund was approved by {V} on Monday.",
    ),
}


def _locales(provider: str) -> tuple[str, ...]:
    package = importlib.import_module(f"faker.providers.{provider}")
    return tuple(sorted(m.name for m in pkgutil.iter_modules(package.__path__)))


# en_PH's bank provider logs a warning with every account number it makes up.
logging.getLogger("faker.providers.bank.en_PH").setLevel(logging.ERROR)

_PROVIDERS = {
    "CARD": ["faker.providers.credit_card"],
    "IBAN": ["faker.providers.bank"],
    "EMAIL": [
        "faker.providers.person",
        "faker.providers.internet",
        "faker.providers.company",
        "faker.providers.lorem",
        "faker.providers.date_time",
        "faker.providers.address",
    ],
    "PHONE": ["faker.providers.phone_number"],
    "NAME": ["faker.providers.person"],
}


@cache
def _faker(kind: str, locale: str) -> Faker:
    # Only the providers `kind` needs: a Faker with all of them takes a quarter of a second.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated locales (fr_QC) warn
        return Faker(locale, providers=_PROVIDERS[kind])


@cache
def locales(kind: str) -> tuple[str, ...]:
    """Every Faker locale with a provider for `kind`."""
    provider = {
        "CARD": "credit_card",
        "IBAN": "bank",
        "EMAIL": "internet",
        "PHONE": "phone_number",
        "NAME": "person",
    }[kind]
    found = []
    for locale in _locales(provider):
        try:
            fake = _faker(kind, locale)
        except AttributeError:
            continue
        methods = {"CARD": ("credit_card_number",), "IBAN": ("iban",), "EMAIL": ("email",)}.get(
            kind, _PHONE_METHODS if kind == "PHONE" else ("name",)
        )
        if any(hasattr(fake, method) for method in methods):
            found.append(locale)
    return tuple(found)


def _card(fake: Faker, rng: random.Random, locale: str) -> str:
    provider = importlib.import_module(f"faker.providers.credit_card.{locale}").Provider
    number: str = fake.credit_card_number(rng.choice(sorted(provider.credit_card_types)))
    style = rng.randrange(3)
    if style == 0:
        return number
    sep = " " if style == 1 else "-"
    if len(number) == 15 and number[:2] in ("34", "37"):
        return sep.join((number[:4], number[4:10], number[10:]))
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


def _iban(fake: Faker, rng: random.Random, _locale: str) -> str:
    iban: str = fake.iban()
    if rng.random() < 0.5:
        return iban
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))


def _email(fake: Faker, rng: random.Random, _locale: str) -> str:
    method = rng.choice(("email", "free_email", "company_email", "safe_email", "ascii_email"))
    return str(getattr(fake, method)())


# The Philippine locales have no phone_number(), only mobile and landline numbers.
_PHONE_METHODS = ("phone_number", "mobile_number", "landline_number")


def _phone(fake: Faker, rng: random.Random, _locale: str) -> str:
    methods = [m for m in _PHONE_METHODS if hasattr(fake, m)]
    return str(getattr(fake, rng.choice(methods))())


_PREFIX_ATTRS = ("prefixes", "prefixes_male", "prefixes_female", "prefixes_nonbinary")
_SUFFIX_ATTRS = ("suffixes", "suffixes_male", "suffixes_female", "suffixes_nonbinary")


@cache
def _titles(locale: str) -> tuple[frozenset[str], frozenset[str]]:
    provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
    prefixes: set[str] = set()
    suffixes: set[str] = set()
    for attrs, into in ((_PREFIX_ATTRS, prefixes), (_SUFFIX_ATTRS, suffixes)):
        for attr in attrs:
            into.update(str(v) for v in getattr(provider, attr, ()) if str(v).strip())
    return frozenset(prefixes), frozenset(suffixes)


def _name(fake: Faker, _rng: random.Random, locale: str) -> str:
    """A Faker name without its title or suffix ("Dr." and "MD" are not the person)."""
    name = " ".join(str(fake.name()).split())
    prefixes, suffixes = _titles(locale)
    changed = True
    while changed:
        changed = False
        for prefix in sorted(prefixes, key=len, reverse=True):
            if name.startswith(prefix + " "):
                name, changed = name[len(prefix) + 1 :], True
        for suffix in sorted(suffixes, key=len, reverse=True):
            if name.endswith(" " + suffix):
                name, changed = name[: -len(suffix) - 1], True
    return name.rstrip(" ,")


_VALUES: dict[str, Callable[[Faker, random.Random, str], str]] = {
    "CARD": _card,
    "IBAN": _iban,
    "EMAIL": _email,
    "PHONE": _phone,
    "NAME": _name,
}
_SLOT = re.compile(r"\{V\}")


def generate(kind: str, per_locale: int, *, seed: int, only: tuple[str, ...] = ()) -> list[Sample]:
    """`per_locale` labelled samples of `kind` from every locale that ships it (or `only`)."""
    rng = random.Random(f"{seed}/{kind}")
    out = []
    # Six locales ship card providers, with up to 29 card types each: five times as many cards.
    count = per_locale * (5 if kind == "CARD" else 1)
    for locale in only or locales(kind):
        fake = _faker(kind, locale)
        fake.seed_instance(rng.randrange(2**32))
        for _ in range(count):
            value = _VALUES[kind](fake, rng, locale)
            shape = rng.choice(SHAPES[kind]).replace("{{", "{").replace("}}", "}")
            slot = _SLOT.search(shape)
            assert slot is not None
            text = shape[: slot.start()] + value + shape[slot.end() :]
            # Faker's phone lists hold emergency and service numbers ("999", "12##"): public,
            # nobody's own, and never redacted; they are counted apart.
            short = kind == "PHONE" and sum(c.isdigit() for c in value) < 6
            label = Label(slot.start(), slot.start() + len(value), "SERVICE" if short else kind)
            out.append(Sample(text, (label,), f"{kind}/{locale}"))
    return out


def evaluate_split(per_locale: int, *, seed: int) -> dict[str, Evaluation]:
    """Recall and precision of each kind on its own Faker corpus."""
    return {kind: evaluate(generate(kind, per_locale, seed=seed)) for kind in KINDS}


def merged(results: dict[str, Evaluation]) -> Evaluation:
    """One evaluation with each kind's counts from its own corpus."""
    out = Evaluation()
    for kind, result in results.items():
        for shown in (kind, "SERVICE") if kind == "PHONE" else (kind,):
            if shown in result:
                out[shown] = result[shown]
        for other, counts in result.items():
            if other != kind:
                out.misses.setdefault(f"FP {other} in {kind} corpus", []).extend(
                    result.misses.get(f"FP {other}", [])
                )
                if counts.fp:
                    out.misses[f"FP {other} in {kind} corpus"].insert(0, f"{counts.fp} spans")
        out.misses.update({k: v for k, v in result.misses.items() if k in (kind, f"FP {kind}")})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-locale", type=int, default=20)
    parser.add_argument("--held-out", action="store_true", help="score the held-out seed too")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--show-misses", type=int, default=0)
    args = parser.parse_args(argv)
    seeds = [("tuning", TUNING_SEED)] + ([("held-out", HELD_OUT_SEED)] if args.held_out else [])
    for split, seed in seeds:
        results = {
            kind: evaluate(generate(kind, args.per_locale, seed=seed))
            for kind in args.kinds.split(",")
        }
        print(f"## {split}\n\n{table(merged(results))}\n")
        if args.show_misses and split == "tuning":
            for kind, result in results.items():
                for key, misses in result.misses.items():
                    for miss in misses[: args.show_misses]:
                        print(f"{kind} corpus {key}: {miss}", file=sys.stderr)


if __name__ == "__main__":
    main()
