"""What the racer observed of each host, rolling and decaying: p95 first-token latency, the
timeout/error rate and duel quality that feed S(h)'s scorers (`llooma.selection`). Built from
race events and duel results, never from what a host claims."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from llooma.duel import duel_score
from llooma.v1.duel_pb2 import DUEL_VERDICT_A, DUEL_VERDICT_B, DuelResult
from llooma.v1.race_pb2 import ATTEMPT_ROLE_CONTINUATION, RaceEvent
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_FAILED, ATTEMPT_OUTCOME_REJECTED

# Observations older than this no longer count toward p95.
LATENCY_WINDOW_S = 300.0
LATENCY_SAMPLES = 256
# Each new attempt moves the error rate this far toward its outcome (about the last 20).
ERROR_EWMA_ALPHA = 0.1
# Duel quality starts mid-range and each judged duel moves it this far toward the duel's score
# (won 1, tie 0.5, lost 0): duels are rare (p_d), so a few of them must count.
UNKNOWN_QUALITY = 0.5
DUEL_EWMA_ALPHA = 0.2


@dataclass
class HostRecord:
    first_token_ms: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=LATENCY_SAMPLES)
    )
    error_rate: float = 0.0
    attempts: int = 0
    quality: float = UNKNOWN_QUALITY
    duels: int = 0

    def quantile_ms(self, q: float, now: float) -> float | None:
        recent = sorted(ms for at, ms in self.first_token_ms if now - at <= LATENCY_WINDOW_S)
        if not recent:
            return None
        return recent[min(len(recent) - 1, math.ceil(q * len(recent)) - 1)]


class HostStats:
    def __init__(self) -> None:
        self._hosts: dict[str, HostRecord] = {}

    def record(self, event: RaceEvent, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for attempt in event.attempts:
            if attempt.outcome == ATTEMPT_OUTCOME_REJECTED:
                # The engine refused the client's request: no error of the host's, and no
                # success either (refusing everything must not polish a score).
                continue
            host = self._hosts.setdefault(attempt.host_id, HostRecord())
            host.attempts += 1
            # A winner that broke a rule (violations) still won, but it is an error for S(h).
            failed = attempt.outcome == ATTEMPT_OUTCOME_FAILED
            bad = failed or attempt.stalled or attempt.violations > 0
            host.error_rate += ERROR_EWMA_ALPHA * (float(bad) - host.error_rate)
            if attempt.first_token_ms and attempt.role != ATTEMPT_ROLE_CONTINUATION:
                host.first_token_ms.append((now, float(attempt.first_token_ms)))
            elif not attempt.first_token_ms and attempt.outcome != ATTEMPT_OUTCOME_FAILED:
                # A loser cancelled before its first token was at least as slow as the race.
                host.first_token_ms.append((now, float(event.first_token_ms)))

    def p95_ms(self, host_id: str, now: float | None = None) -> float | None:
        record = self._hosts.get(host_id)
        return (
            record.quantile_ms(0.95, time.monotonic() if now is None else now) if record else None
        )

    def p90_ms(self, host_id: str, now: float | None = None) -> float | None:
        record = self._hosts.get(host_id)
        return (
            record.quantile_ms(0.90, time.monotonic() if now is None else now) if record else None
        )

    def error_rate(self, host_id: str) -> float:
        record = self._hosts.get(host_id)
        return record.error_rate if record else 0.0

    def record_duel(self, result: DuelResult) -> None:
        """Fold a judged duel into both duelists' quality (an undecided one says nothing)."""
        for host_id, side in ((result.host_a, DUEL_VERDICT_A), (result.host_b, DUEL_VERDICT_B)):
            score = duel_score(result.outcome, side)
            if score is None or not host_id:
                continue
            host = self._hosts.setdefault(host_id, HostRecord())
            host.duels += 1
            host.quality += DUEL_EWMA_ALPHA * (score - host.quality)

    def quality(self, host_id: str) -> float:
        record = self._hosts.get(host_id)
        return record.quality if record else UNKNOWN_QUALITY

    def duels(self, host_id: str) -> int:
        record = self._hosts.get(host_id)
        return record.duels if record else 0
