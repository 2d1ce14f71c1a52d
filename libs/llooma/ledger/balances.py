"""User balances in the balances KV bucket: accounting writes them, the ingress watches them
(so the request path never reads Postgres). Key: api_key_id; value: micro-credits, ASCII."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from llooma import subjects

log = logging.getLogger(__name__)

# Balances change only with traffic: a watch this quiet is renewed, in case a restarted
# server dropped its consumer without telling the client (renewing re-reads every key).
WATCH_IDLE_S = 5.0


def encode_balance(micros: int) -> bytes:
    return str(micros).encode()


async def publish_balances(js: JetStreamContext, balances: dict[str, int]) -> None:
    kv = await js.key_value(subjects.BALANCES_BUCKET)
    for key_id, micros in balances.items():
        await kv.put(key_id, encode_balance(micros))


class BalanceBook:
    """A live view of every user's balance."""

    def __init__(self) -> None:
        self._balances: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    def balance(self, api_key_id: str) -> int:
        """The last published balance; a key never credited has none (0)."""
        return self._balances.get(api_key_id, 0)

    async def start(self, js: JetStreamContext) -> None:
        kv = await js.key_value(subjects.BALANCES_BUCKET)
        self._task = asyncio.create_task(self._watch(kv), name="watch-balances")
        await asyncio.wait_for(self._loaded.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, kv: KeyValue) -> None:
        while True:
            try:
                watcher = await kv.watchall()
                while True:
                    try:
                        entry = await watcher.updates(timeout=WATCH_IDLE_S)  # type: ignore[no-untyped-call]
                    except nats.errors.TimeoutError:
                        with contextlib.suppress(Exception):
                            await watcher.stop()  # type: ignore[no-untyped-call]
                        break
                    if entry is None:
                        self._loaded.set()
                    elif entry.operation in ("DEL", "PURGE") or not entry.value:
                        self._balances.pop(entry.key, None)
                    else:
                        try:
                            self._balances[entry.key] = int(entry.value)
                        except ValueError:
                            log.warning("unreadable balance under %s", entry.key)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("watch on the balances bucket broke; re-watching", exc_info=True)
                await asyncio.sleep(0.5)
