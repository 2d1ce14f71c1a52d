"""Hosts' locked stake in the stakes KV bucket: accounting writes it from the ledger, the
dispatcher watches it (so no draw reads Postgres). Key: host id; value: micro-credits, ASCII."""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from llooma import subjects
from llooma.kv_view import QUIET_FILE_BUCKET_RENEW_S, BucketView
from llooma.ledger.balances import encode_balance

log = logging.getLogger(__name__)

MICROS_PER_CREDIT = 1_000_000


async def publish_stakes(js: JetStreamContext, stakes: dict[str, int]) -> None:
    kv = await js.key_value(subjects.STAKES_BUCKET)
    await asyncio.gather(
        *(kv.put(host_id, encode_balance(micros)) for host_id, micros in stakes.items())
    )


class StakeBook(BucketView):
    """A live view of every host's locked stake."""

    def __init__(self) -> None:
        super().__init__(subjects.STAKES_BUCKET, idle_renew_s=QUIET_FILE_BUCKET_RENEW_S)
        self._locked: dict[str, int] = {}

    def locked_micros(self, host_id: str) -> int:
        return self._locked.get(host_id, 0)

    def apply(self, entry: KeyValue.Entry) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._locked.pop(entry.key, None)
            return
        try:
            self._locked[entry.key] = int(entry.value)
        except ValueError:
            log.warning("unreadable stake under %s", entry.key)
