"""The ledger: the paper's economics, double-entry posting into Postgres, signed credit
blocks and their verification, user balances in KV, and reports."""

from __future__ import annotations

from pathlib import Path

from llooma.settings import Settings

DEFAULT_SIGNING_KEY_FILE = Path(".llooma/accounting/ledger-signing.key")


def signing_key_path(settings: Settings) -> Path:
    return Path(settings.ledger_signing_key_file or DEFAULT_SIGNING_KEY_FILE)


__all__ = ["DEFAULT_SIGNING_KEY_FILE", "signing_key_path"]
