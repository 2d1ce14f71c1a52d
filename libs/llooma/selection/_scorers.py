"""Scorers: the terms of S(h), each named, in [0, 1] once clamped, lower is better; S(h) is
their weighted sum. A new term is one function here, its name in SCORERS and a weight."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from llooma.selection._filters import Ask, Endpoint, Policy, silence_allowed_s
from llooma.settings import Settings

# A host with no record yet sits mid-range on latency: neither favoured nor shut out.
UNKNOWN_LATENCY_TERM = 0.5


class Observed(Protocol):
    """What the racer observed of each host (`host_stats.HostStats`)."""

    def p95_ms(self, host_id: str, now: float | None = None) -> float | None: ...

    def error_rate(self, host_id: str) -> float: ...

    def quality(self, host_id: str) -> float: ...


class NothingObserved:
    """No record of any host: every host unknown (admission needs no scores)."""

    def p95_ms(self, host_id: str, now: float | None = None) -> float | None:
        return None

    def error_rate(self, host_id: str) -> float:
        return 0.0

    def quality(self, host_id: str) -> float:
        return 0.5


@dataclass(frozen=True, slots=True)
class Context:
    stats: Observed
    policy: Policy


Scorer = Callable[[Endpoint, Ask, Context], float]


def load(endpoint: Endpoint, ask: Ask, context: Context) -> float:
    """In-flight tasks over capacity, from the heartbeat."""
    return endpoint.host.heartbeat.load


def latency_p95(endpoint: Endpoint, ask: Ask, context: Context) -> float:
    """Observed p95 first-token latency as a share of the request's deadline."""
    p95 = context.stats.p95_ms(endpoint.host_id)
    return UNKNOWN_LATENCY_TERM if p95 is None else p95 / ask.deadline_ms


def staleness(endpoint: Endpoint, ask: Ask, context: Context) -> float:
    """Heartbeat age as a share of the age at which this host stops counting."""
    host = endpoint.host
    return host.staleness_s / silence_allowed_s(host.heartbeat, context.policy.stale_after_s)


def error_rate(endpoint: Endpoint, ask: Ask, context: Context) -> float:
    """Failed, stalled or rule-breaking attempts, as observed (EWMA)."""
    return context.stats.error_rate(endpoint.host_id)


def quality_deficit(endpoint: Endpoint, ask: Ask, context: Context) -> float:
    """1 - the host's duel quality (0.5 for a host never judged)."""
    return 1.0 - context.stats.quality(endpoint.host_id)


SCORERS: dict[str, Scorer] = {
    "load": load,
    "latency_p95": latency_p95,
    "staleness": staleness,
    "error_rate": error_rate,
    "quality_deficit": quality_deficit,
}

DEFAULT_WEIGHTS: dict[str, float] = {
    "load": 0.40,
    "latency_p95": 0.30,
    "staleness": 0.20,
    "error_rate": 0.10,
    # Duel-and-judge quality (settings.duel_quality_weight); off unless configured.
    "quality_deficit": 0.0,
}


def weights_from_settings(settings: Settings) -> dict[str, float]:
    load_w, latency_w, staleness_w, error_w = settings.score_weights
    return {
        "load": load_w,
        "latency_p95": latency_w,
        "staleness": staleness_w,
        "error_rate": error_w,
        "quality_deficit": settings.duel_quality_weight,
    }


def clamp01(value: float) -> float:
    """Into [0, 1]; NaN counts as the worst (1), so no term can poison a sort."""
    if value != value:  # NaN
        return 1.0
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


def weighted(terms: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """S(h): each term clamped to [0, 1] times its weight (a term with no weight counts 0)."""
    return sum(weights.get(name, 0.0) * clamp01(value) for name, value in terms.items())


def score_terms(
    endpoint: Endpoint,
    ask: Ask,
    context: Context,
    scorers: Mapping[str, Scorer] = SCORERS,
) -> dict[str, float]:
    """Every scorer's raw term for one endpoint, by name."""
    return {name: scorer(endpoint, ask, context) for name, scorer in scorers.items()}
