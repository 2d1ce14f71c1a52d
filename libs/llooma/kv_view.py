"""A live in-memory view of a JetStream KV bucket, kept by a watch that renews itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod

import nats.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

# The server forgets a watch's consumer this long after its subscriber left (nats-py's default
# is 5 minutes): every renewal leaves one behind, and each costs the server timers until then.
ABANDONED_WATCH_S = 15.0
# For a file bucket that is quiet at rest (balances, keys). A server restart that drops the
# watch's consumer is healed by nats-py's ordered consumer itself (it resumes from its last
# sequence after two missed idle heartbeats, 10 s; right for a file bucket, whose sequences
# survive); renewing, which re-reads every key, is only the net for a bucket made anew.
QUIET_FILE_BUCKET_RENEW_S = 60.0


class BucketView(ABC):
    """Applies every entry of one bucket as it changes; `start` returns once the bucket's
    current contents are in. A watch quiet for `idle_renew_s` is renewed, because a restarted
    server drops the watch's consumer without telling the client (renewing re-reads all)."""

    def __init__(self, bucket: str, *, idle_renew_s: float) -> None:
        self._bucket = bucket
        self._idle_renew_s = idle_renew_s
        self._task: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()

    @abstractmethod
    def apply(self, entry: KeyValue.Entry) -> None:
        """Fold one put, delete or purge into the view."""

    async def start(self, js: JetStreamContext) -> None:
        kv = await js.key_value(self._bucket)
        self._task = asyncio.create_task(self._watch(kv), name=f"watch-{self._bucket}")
        await asyncio.wait_for(self._loaded.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, kv: KeyValue) -> None:
        while True:
            try:
                watcher = await kv.watchall(inactive_threshold=ABANDONED_WATCH_S)
                while True:
                    try:
                        entry = await watcher.updates(timeout=self._idle_renew_s)  # type: ignore[no-untyped-call]
                    except nats.errors.TimeoutError:
                        with contextlib.suppress(Exception):
                            await watcher.stop()  # type: ignore[no-untyped-call]
                        break
                    if entry is None:
                        self._loaded.set()
                    else:
                        self.apply(entry)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("watch on %s broke; re-watching", self._bucket, exc_info=True)
                await asyncio.sleep(0.5)
