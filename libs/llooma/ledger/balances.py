"""User balances in the balances KV bucket: accounting writes them, the ingress watches them
(so the request path never reads Postgres). Key: api_key_id; value: micro-credits, ASCII."""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from llooma import subjects
from llooma.kv_view import QUIET_FILE_BUCKET_RENEW_S, BucketView

log = logging.getLogger(__name__)


def encode_balance(micros: int) -> bytes:
    return str(micros).encode()


async def publish_balances(js: JetStreamContext, balances: dict[str, int]) -> None:
    kv = await js.key_value(subjects.BALANCES_BUCKET)
    await asyncio.gather(
        *(kv.put(key_id, encode_balance(micros)) for key_id, micros in balances.items())
    )


async def publish_balances_complete(js: JetStreamContext) -> None:
    kv = await js.key_value(subjects.BALANCES_BUCKET)
    await kv.put(subjects.BALANCES_COMPLETE_KEY, b"1")


class BalanceBook(BucketView):
    """A live view of every user's balance."""

    def __init__(self) -> None:
        super().__init__(subjects.BALANCES_BUCKET, idle_renew_s=QUIET_FILE_BUCKET_RENEW_S)
        self._balances: dict[str, int] = {}
        self._complete = False

    def balance(self, api_key_id: str) -> int | None:
        """The last published balance; None if none was published (yet) for this key."""
        return self._balances.get(api_key_id)

    def refuses(self, api_key_id: str) -> bool:
        """Whether this key has nothing left to spend: a published balance <= 0, or none at
        all once accounting has published every balance (before that, unknown is not 0)."""
        balance = self._balances.get(api_key_id)
        if balance is None:
            return self._complete
        return balance <= 0

    def apply(self, entry: KeyValue.Entry) -> None:
        if entry.key == subjects.BALANCES_COMPLETE_KEY:
            self._complete = entry.operation not in ("DEL", "PURGE") and bool(entry.value)
            return
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._balances.pop(entry.key, None)
            return
        try:
            self._balances[entry.key] = int(entry.value)
        except ValueError:
            log.warning("unreadable balance under %s", entry.key)
