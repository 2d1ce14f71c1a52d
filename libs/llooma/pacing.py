"""A heartbeat's pace, for services and hosts alike: every `busy_s` while there is work in
flight, every `idle_s` at rest, each beat announcing when the next is due (its `next_beat_ms`).
Readers judge a member by what it announced, so a quiet member costs a message every `idle_s`
while one that dies holding work is still missed quickly. Work that arrives after a long
announcement makes the next beat due at once, with the short one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class BeatPacer:
    """Runs `publish` on the pace above; `publish` builds its beat with `announce()`."""

    def __init__(
        self,
        publish: Callable[[], Awaitable[None]],
        *,
        busy_s: float,
        idle_s: float,
        busy: Callable[[], bool],
        name: str,
    ) -> None:
        self._publish = publish
        self._busy_s = busy_s
        self._idle_s = max(busy_s, idle_s)
        self._busy = busy
        self._name = name
        self._announced_s = self._idle_s
        self._due_now = asyncio.Event()
        self._early_after_s = 0.0
        self._last_beat = 0.0
        self._task: asyncio.Task[None] | None = None

    def announce(self) -> float:
        """The wait until the next beat, for the beat being built now (and kept to)."""
        self._announced_s = self._busy_s if self._busy() else self._idle_s
        return self._announced_s

    def work_started(self) -> None:
        """Work arrived: if the last beat promised the long wait, beat now with the short one
        (readers would otherwise miss a death for as long as that beat promised)."""
        if self._announced_s > self._busy_s:
            self._due_now.set()

    def beat_now(self) -> None:
        """The next beat at once, whatever was announced (e.g. after a reconnect)."""
        self._due_now.set()

    def beat_early(self, min_gap_s: float) -> None:
        """What the beat reports changed: beat now, or `min_gap_s` after the last beat if that
        is later (a busy process beats at most once a gap, however often this is called)."""
        self._early_after_s = min_gap_s
        self._due_now.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due_now.wait(), self._announced_s)
            gap_s = self._last_beat + self._early_after_s - time.monotonic()
            if gap_s > 0:
                await asyncio.sleep(gap_s)
            # After the gap: what changed during it goes out with this beat, not another.
            self._due_now.clear()
            self._early_after_s = 0.0
            self._last_beat = time.monotonic()
            try:
                await self._publish()
            except Exception:
                log.warning("%s failed", self._name, exc_info=True)
