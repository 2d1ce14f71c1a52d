"""Deadlines from what each host really does (issue 14, item 8). The racer sees every chunk, so
it learns each host's pace for each model itself, from its own races (no wire change): how long
the first token takes, per prompt token too, and the longest pause inside a stream.

- First-token deadline δ: the assignment's δ, raised to 1.5 x the raced hosts' p95 first-token
  time when that is longer (a slow engine is not sent to the fallback for being itself), at
  most MAX_FIRST_TOKEN_FACTOR x δ; a client's own deadline header is the bound, kept as asked.
- Stall deadline: the assignment's, raised to 1.5 x the host's p95 of its streams' longest
  pauses, plus the time the engine needs to prefill the prompts now waiting for their first
  token on that same host (llama.cpp pauses every stream while it prefills another request),
  at the host's observed seconds per prompt token; re-evaluated whenever the race waits, so a
  prefill that starts mid-stream extends it. At most MAX_STALL_FACTOR x the assignment's.

Until a host has MIN_SAMPLES observations, the assignment's deadlines hold unchanged."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from llooma.v1.pipeline_pb2 import TaskAssignment
from llooma.v1.race_pb2 import ATTEMPT_ROLE_CONTINUATION
from services.racer.state import Attempt, Race

MIN_SAMPLES = 20
SAMPLES = 200
MARGIN = 1.5
MAX_FIRST_TOKEN_FACTOR = 4.0
MAX_STALL_FACTOR = 8.0


@dataclass(slots=True)
class _Observed:
    first_token_s: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    prefill_s_per_token: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    longest_pause_s: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    # Derived when a race is recorded, read on every wait: None until MIN_SAMPLES.
    first_token_p95_s: float | None = None
    pause_p95_s: float | None = None
    prefill_rate: float | None = None

    def derive(self) -> None:
        self.first_token_p95_s = _quantile(self.first_token_s, 0.95)
        self.pause_p95_s = _quantile(self.longest_pause_s, 0.95)
        self.prefill_rate = _quantile(self.prefill_s_per_token, 0.5)


class Pace:
    """Shared by every race of one racer: observations in, deadlines out."""

    def __init__(self) -> None:
        self._observed: dict[tuple[str, str], _Observed] = {}
        # Attempts launched and not yet settled, by host: whose prompts may be prefilling.
        self._live: dict[str, dict[str, Attempt]] = {}

    # -- observations ----------------------------------------------------------------------

    def launched(self, attempt: Attempt) -> None:
        self._live.setdefault(attempt.host.host_id, {})[attempt.attempt_id] = attempt

    def settled(self, race: Race) -> None:
        """Learn from a finished race, and forget its attempts."""
        touched = set()
        for attempt in race.attempts.values():
            live = self._live.get(attempt.host.host_id)
            if live is not None:
                live.pop(attempt.attempt_id, None)
                if not live:
                    del self._live[attempt.host.host_id]
            key = (attempt.host.host_id, attempt.host.model)
            observed = self._observed.setdefault(key, _Observed())
            if attempt.first_token_at is not None and attempt.role != ATTEMPT_ROLE_CONTINUATION:
                latency = attempt.first_token_at - attempt.launched_at
                observed.first_token_s.append(latency)
                observed.prefill_s_per_token.append(latency / max(1, attempt.prompt_tokens))
                touched.add(key)
            if attempt.last_token_at and attempt.delivered > 1 and not attempt.stalled:
                # Only streams the racer timed token by token (a winner's, a continuation's).
                observed.longest_pause_s.append(attempt.longest_pause_s)
                touched.add(key)
        for key in touched:
            self._observed[key].derive()

    # -- deadlines -------------------------------------------------------------------------

    def first_token_s(self, assignment: TaskAssignment) -> float:
        given = assignment.first_token_deadline_ms / 1000.0
        paces = [self._p95_first_token(h.host_id, h.model) for h in assignment.hosts]
        if not paces or any(p is None for p in paces):
            return given
        pace = MARGIN * max(p for p in paces if p is not None)
        if assignment.request.first_token_deadline_ms:
            return given  # the client's own deadline: the bound, as asked
        return min(max(given, pace), MAX_FIRST_TOKEN_FACTOR * given)

    def stall_s(self, attempt: Attempt, assignment: TaskAssignment) -> float:
        given = assignment.stall_deadline_ms / 1000.0
        observed = self._observed.get((attempt.host.host_id, attempt.host.model))
        if observed is None:
            return given
        stall = given
        if observed.pause_p95_s is not None:
            stall = max(stall, MARGIN * observed.pause_p95_s)
        if observed.prefill_rate is not None:
            waiting = _prefilling(self._live.get(attempt.host.host_id, {}).values(), attempt)
            stall += observed.prefill_rate * waiting
        return min(stall, MAX_STALL_FACTOR * given)

    def _p95_first_token(self, host_id: str, model: str) -> float | None:
        observed = self._observed.get((host_id, model))
        return observed.first_token_p95_s if observed is not None else None


class Deadlines(Protocol):
    """What the race core asks of a deadline policy."""

    def first_token_s(self, assignment: TaskAssignment) -> float: ...

    def stall_s(self, attempt: Attempt, assignment: TaskAssignment) -> float: ...


class FixedDeadlines:
    """The assignment's deadlines as they are (no observations)."""

    def first_token_s(self, assignment: TaskAssignment) -> float:
        return assignment.first_token_deadline_ms / 1000.0

    def stall_s(self, attempt: Attempt, assignment: TaskAssignment) -> float:
        return assignment.stall_deadline_ms / 1000.0


def _prefilling(attempts: Iterable[Attempt], streaming: Attempt) -> int:
    """Prompt tokens of the host's other attempts still waiting for their first token."""
    return sum(
        a.prompt_tokens
        for a in attempts
        if a is not streaming
        and a.first_token_at is None
        and not (a.failed or a.cancelled or a.stalled)
    )


def _quantile(samples: deque[float], q: float) -> float | None:
    if len(samples) < MIN_SAMPLES:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
