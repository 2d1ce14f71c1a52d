"""One key's record as the ingresses see it, and their live view of the bucket."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass

import orjson
from nats.js.kv import KeyValue

from llooma import subjects
from llooma.kv_view import QUIET_FILE_BUCKET_RENEW_S, BucketView

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-llooma-"
# Shown in listings so a person can tell keys apart; never enough to guess the rest.
SHOWN_CHARS = len(KEY_PREFIX) + 4


def new_api_key() -> str:
    """A new key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def shown_prefix(key: str) -> str:
    return key[:SHOWN_CHARS] + "..."


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What an ingress needs to admit a key's request (its balance comes from the balances
    bucket): limits of 0 mean the ingress's defaults, no models means every model, an expiry
    of 0 means never."""

    key_id: str
    name: str
    owner: str = ""
    prefix: str = ""
    rpm: int = 0
    tpm: int = 0
    models: tuple[str, ...] = ()
    expires_unix_ms: int = 0
    created_unix_ms: int = 0
    revoked_unix_ms: int = 0

    def expired(self, now_ms: int | None = None) -> bool:
        if not self.expires_unix_ms:
            return False
        return (now_ms if now_ms is not None else int(time.time() * 1000)) >= self.expires_unix_ms

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models

    def to_dict(self) -> dict[str, object]:
        body = asdict(self)
        body["models"] = list(self.models)
        return body

    def encode(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def decode(cls, data: bytes) -> KeyRecord:
        body = orjson.loads(data)
        body["models"] = tuple(body.get("models") or ())
        return cls(**body)


class KeyBook(BucketView):
    """Every managed key that is not revoked, by key id."""

    def __init__(self) -> None:
        super().__init__(subjects.KEYS_BUCKET, idle_renew_s=QUIET_FILE_BUCKET_RENEW_S)
        self.records: dict[str, KeyRecord] = {}

    def get(self, key_id: str) -> KeyRecord | None:
        return self.records.get(key_id)

    def apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self.records.pop(entry.key, None)
            return
        try:
            self.records[entry.key] = KeyRecord.decode(entry.value)
        except (ValueError, TypeError):
            log.warning("unreadable key record under %s", entry.key)
