"""API keys an operator manages: records in Postgres (accounting's key service), published to
the `llooma_api_keys` KV bucket that every ingress watches, so a created, changed or revoked
key takes effect everywhere within about a second, without a restart."""

from __future__ import annotations

from llooma.keys._record import KeyBook, KeyRecord, new_api_key, shown_prefix
from llooma.keys._store import Changes, KeyStore, UsageLine, parse_time

__all__ = [
    "Changes",
    "KeyBook",
    "KeyRecord",
    "KeyStore",
    "UsageLine",
    "new_api_key",
    "parse_time",
    "shown_prefix",
]
