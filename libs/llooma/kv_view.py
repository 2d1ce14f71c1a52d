"""A live in-memory view of a JetStream KV bucket: every put heard on a core subscription, the
bucket read whole at start and re-read as a net.

A KV put is an ordinary message on `$KV.<bucket>.<key>` (the stream behind the bucket is one
more listener), so a plain subscription hears each one as it is published, with no consumer on
the server. A KV watch (a nats-py ordered push consumer) costs, for every watcher at rest, the
server's idle heartbeat every 5 s and a flow-control poll four times a second in the client;
these buckets are quiet at rest (balances, stakes, keys), so that was most of what their views
cost. What a subscription misses while NATS is away is healed by the re-read (every
`idle_renew_s`), as the watch's renewal did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KV_OP, KeyValue

from llooma import subjects

log = logging.getLogger(__name__)

# For a file bucket that is quiet at rest (balances, keys, stakes): how often the whole bucket
# is read again, the net for puts published while this process was disconnected.
QUIET_FILE_BUCKET_RENEW_S = 60.0
# How long one read of the whole bucket may take.
READ_TIMEOUT_S = 10.0
# The server forgets a read's consumer this long after the read stopped (nats-py's default is
# 5 minutes, and each lingering consumer costs the server timers until then).
ABANDONED_WATCH_S = 15.0


async def read_all(kv: KeyValue, apply: Callable[[KeyValue.Entry], None]) -> None:
    """Apply every entry `kv` holds now: a short-lived watch, read to its end and stopped."""
    watcher = await kv.watchall(inactive_threshold=ABANDONED_WATCH_S)
    try:
        while (entry := await watcher.updates(timeout=READ_TIMEOUT_S)) is not None:  # type: ignore[no-untyped-call]
            apply(entry)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]


class BucketView(ABC):
    """Applies every entry of one bucket as it changes; `start` returns once the bucket's
    current contents are in."""

    def __init__(self, bucket: str, *, idle_renew_s: float) -> None:
        self._bucket = bucket
        self._idle_renew_s = idle_renew_s
        self._prefix = subjects.kv_put_subject(bucket, "")
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        # Puts heard while the bucket is being read: applied after what was read (newer).
        self._heard_while_reading: list[KeyValue.Entry] | None = None

    @abstractmethod
    def apply(self, entry: KeyValue.Entry) -> None:
        """Fold one put, delete or purge into the view."""

    async def start(self, js: JetStreamContext) -> None:
        kv = await js.key_value(self._bucket)
        self._subscription = await js._nc.subscribe(f"{self._prefix}>", cb=self._on_put)
        await self._read(kv)
        self._task = asyncio.create_task(self._reread(kv), name=f"reread-{self._bucket}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()
            self._subscription = None

    async def _on_put(self, msg: Msg) -> None:
        operation = msg.headers.get(KV_OP) if msg.headers else None
        entry = KeyValue.Entry(
            bucket=self._bucket,
            key=msg.subject[len(self._prefix) :],
            value=msg.data,
            revision=None,
            delta=None,
            created=None,
            operation=operation,
        )
        if self._heard_while_reading is not None:
            self._heard_while_reading.append(entry)
        else:
            self.apply(entry)

    async def _read(self, kv: KeyValue) -> None:
        """Apply every entry the bucket holds, then what was heard meanwhile, in order."""
        self._heard_while_reading = []
        try:
            await read_all(kv, self.apply)
        finally:
            heard, self._heard_while_reading = self._heard_while_reading, None
            for entry in heard:
                self.apply(entry)

    async def _reread(self, kv: KeyValue) -> None:
        while True:
            await asyncio.sleep(self._idle_renew_s)
            try:
                await self._read(kv)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("re-reading %s failed; the next read heals it", self._bucket)
