"""Limits held across every ingress (and every replica of anything else that admits work): a
JetStream counter stream (ADR-49, `Nats-Incr`), one counter per scope and time window.

A limit of R units a minute becomes `per_window` units per window of `per_window * 60 / R`
seconds (`per_window` = R x burst seconds / 60, at least 1), so the long-run rate is R
whatever the number of processes taking from it. Admission is a sliding window: the previous
window's total, weighted by how much of it still overlaps the last window's length (less
`LATE_S`), plus the current window's must leave room for the request (a large
request's debt so weighs on the next window), and what the previous window left unused (up
to `CARRY` of the allowance) adds to this one's. A take adds its cost to the current
window's counter and gets the new total in the publish ack (one round trip); refused, it
gives the cost back. A process that saw the window full reads the counter (no write) until
it has room again, and one process decides for one scope at a time, so refusals do not
inflate the count. The previous window's total is read afresh once the window is over (what
this process last saw of it misses the others' last takes, or counts a refusal not yet
given back). Corrections (a request's real usage) go into the current window.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import nats.js.errors
import orjson
from nats.js import JetStreamContext

from llooma import bus, subjects

log = logging.getLogger(__name__)

INCR = "Nats-Incr"
# Counters remembered before the memory is cleared (old windows are of no use).
MAX_SEEN = 100_000
# A scope's first use falls this far before the end of its first window.
PHASE_MARGIN = 0.02
# The previous window's weight reaches 0 this long (at most a quarter window) before the
# window ends. Without it a window's last unit opens only in its last 0.5 / per_window, and a
# request arriving a round trip or a client's retry later finds a new window and the unit
# lost: two ingresses under load held 600 rpm 0.4% to 7.2% short. Its units open this much
# earlier; a window still holds no more than its allowance (and what the last one left).
LATE_S = 0.25
LATE_SHARE_MAX = 0.25
# What the previous window left unused, up to this share of the allowance, is added to this
# window's: a window holds whole requests, and requests of 108 tokens fill a window of 800
# to 756 (an 8th would overshoot further), 5.5% short every window; now the next takes an
# 8th. Only what a window in use left (an idle one's would add to the burst after idle), and
# no debt: an overspent window already weighs through its total, and carrying its debt too
# made windows alternate between 8 and 12 of 10.
CARRY = 0.25


@dataclass(frozen=True, slots=True)
class Window:
    per_window: int
    window_s: float


def window_for(per_minute: int, burst_s: float) -> Window:
    """The window whose allowance is about `burst_s` seconds of the rate, at least 1 unit."""
    per_window = max(1, round(per_minute * burst_s / 60.0))
    return Window(per_window, per_window * 60.0 / per_minute)


class SharedCounters:
    def __init__(self, js: JetStreamContext, clock: Callable[[], float] = time.time) -> None:
        self._js = js
        self._clock = clock
        self._pending: set[asyncio.Task[None]] = set()
        # The last total seen per counter (this window's and the previous one's).
        self._seen: dict[str, int] = {}
        # Where each scope's windows start (see `_phase`).
        self._phases: dict[str, float] = {}
        # Per scope, the window whose previous window's total was read once it was over.
        self._previous_read: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def _incr(self, subject: str, amount: int) -> int:
        ack = await self._js.publish(subject, b"", headers={INCR: str(amount)})
        total = int(ack.val or 0)
        self._seen[subject] = total
        return total

    async def _read(self, subject: str) -> int:
        try:
            message = await self._js.get_last_msg(subjects.LIMITS_STREAM, subject)
        except nats.js.errors.NotFoundError:
            total = 0
        else:
            total = int(orjson.loads(message.data or b"{}").get("val", 0))
        self._seen[subject] = total
        return total

    async def _previous(self, scope: str, index: int) -> int:
        subject = subjects.limit_counter(scope, index - 1)
        if self._previous_read.get(scope) != index:
            self._previous_read[scope] = index
            return await self._read(subject)
        seen = self._seen.get(subject)
        return seen if seen is not None else await self._read(subject)

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        bus.keep_task(self._pending, asyncio.create_task(work), "shared limit update")

    async def take(
        self, scope: str, cost: int, window: Window, expected: float | None = None
    ) -> float:
        """0.0 if admitted (its cost counted), else seconds to wait before asking again.
        `expected`: what the request will cost once corrected, if not `cost` (see `fits`)."""
        if len(self._seen) > MAX_SEEN:
            self._seen.clear()
            self._phases.clear()
            self._previous_read.clear()
            self._locks.clear()
        # One decision at a time per scope in this process: a request that would not fit is
        # then refused on what the last one saw, without writing (and inflating) the count.
        async with self._locks.setdefault(scope, asyncio.Lock()):
            return await self._take(scope, cost, window, cost if expected is None else expected)

    async def _take(self, scope: str, cost: int, window: Window, expected: float) -> float:
        phase = await self._phase(scope, window)
        now = self._clock()
        position = (now - phase) / window.window_s
        index = math.floor(position)
        current = subjects.limit_counter(scope, index)
        previous = await self._previous(scope, index)
        late = min(LATE_SHARE_MAX, LATE_S / window.window_s)
        overlap = max(0.0, 1.0 - (position - index) - late)
        unused = 0.0
        # Window 0 holds only the scope's first moments (see `_phase`): what it left unused
        # is not saved up, or a burst of the allowance was followed at once by one more.
        if previous > 0 and index > 1:
            unused = min(CARRY * window.per_window, max(0, window.per_window - previous))
        room = window.per_window + unused - previous * overlap
        wait_s = max(0.001, (index + 1 - position) * window.window_s)

        def fits(before: int) -> bool:
            # Admitted while half the request still fits, so a window ends on average at its
            # allowance (a whole unit would lose one a window, none would gain half a request);
            # half of what it will cost once corrected: requests of 108 tokens estimated at 185
            # filled every window of 800 to 756 (-5.5%). A request larger than the allowance
            # waits for an idle window and leaves a debt.
            return before + expected / 2 < room or (before <= 0 and room >= window.per_window)

        seen = self._seen.get(current)
        # Refused on a read, not a write: a take that is given back would, until then, make
        # the other processes refuse requests that fit.
        if seen is not None and not fits(seen) and not fits(await self._read(current)):
            return wait_s
        total = await self._incr(current, cost)
        if fits(total - cost):
            return 0.0
        await self._give_back(current, cost)
        return wait_s

    async def _phase(self, scope: str, window: Window) -> float:
        """Where the scope's windows start: its first use falls at the end of a window, so
        the burst spent there weighs on the next window at once, as a token bucket refills
        from the first request on (shared by every process through the phases bucket)."""
        phase = self._phases.get(scope)
        if phase is not None:
            return phase
        kv = await self._js.key_value(subjects.LIMIT_PHASES_BUCKET)
        mine = self._clock() - window.window_s * (1.0 - PHASE_MARGIN)
        try:
            await kv.create(scope, repr(mine).encode())
            phase = mine
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await kv.get(scope)
            phase = float(entry.value or b"0")
        self._phases[scope] = phase
        return phase

    def standing(self, scope: str, window: Window) -> tuple[float, float]:
        """(units left in the sliding window, seconds until the current window ends), from
        the totals this process last saw: no round trip."""
        phase = self._phases.get(scope)
        if phase is None:
            return float(window.per_window), 0.0
        position = (self._clock() - phase) / window.window_s
        index = math.floor(position)
        previous = self._seen.get(subjects.limit_counter(scope, index - 1), 0)
        current = self._seen.get(subjects.limit_counter(scope, index), 0)
        room = window.per_window - previous * (1.0 - (position - index))
        return room - current, (index + 1 - position) * window.window_s

    def adjust(self, scope: str, amount: int, window: Window) -> None:
        """Add (or, negative, take back) `amount` in the current window, in the background."""
        if amount:
            phase = self._phases.get(scope, 0.0)
            index = math.floor((self._clock() - phase) / window.window_s)
            self._later(self._give_back(subjects.limit_counter(scope, index), -amount))

    async def _give_back(self, subject: str, amount: int) -> None:
        await self._incr(subject, -amount)
