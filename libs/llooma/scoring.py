"""Host score S(h) and the stake-weighted pick of race participants (pure functions)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ScoreWeights:
    """The paper's S(h) weights; lower S(h) is better."""

    load: float = 0.40
    latency_p95: float = 0.30
    staleness: float = 0.20
    error_rate: float = 0.10
    # Duel-and-judge quality (settings.duel_quality_weight); off unless configured.
    quality: float = 0.0


@dataclass(frozen=True, slots=True)
class ScoreTerms:
    """Each term already scaled to [0, 1]."""

    load: float
    latency_p95: float
    staleness: float
    error_rate: float
    # 1 - the host's duel quality: 0.5 for a host never judged.
    quality_deficit: float = 0.0


@dataclass(frozen=True, slots=True)
class Candidate:
    host_id: str
    model: str
    score: float
    stake: float


def clamp01(value: float) -> float:
    """Into [0, 1]; NaN counts as the worst (1), so no term can poison a sort."""
    if value != value:  # NaN
        return 1.0
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


# Stake is a weight in a draw: heartbeats are checked (llooma.heartbeats), and the draw still
# never takes a weight that is not a finite number within these bounds.
MIN_STAKE_WEIGHT = 1e-3
MAX_STAKE_WEIGHT = 1000.0


def stake_weight(stake: float) -> float:
    if not math.isfinite(stake):
        return MIN_STAKE_WEIGHT
    return min(max(stake, MIN_STAKE_WEIGHT), MAX_STAKE_WEIGHT)


def host_score(terms: ScoreTerms, weights: ScoreWeights) -> float:
    return (
        weights.load * clamp01(terms.load)
        + weights.latency_p95 * clamp01(terms.latency_p95)
        + weights.staleness * clamp01(terms.staleness)
        + weights.error_rate * clamp01(terms.error_rate)
        + weights.quality * clamp01(terms.quality_deficit)
    )


def pick_hosts(
    candidates: list[Candidate], *, k: int, bucket_size: int, rng: random.Random
) -> list[Candidate]:
    """Up to k distinct hosts, drawn by stake without replacement from the best-scoring bucket.

    The bucket holds the `bucket_size` best scores (at least k), so the pick never concentrates
    on one host deterministically, while hosts with more stake are proportionally likelier.
    """
    best_per_host: dict[str, Candidate] = {}
    for candidate in sorted(candidates, key=lambda c: (c.score, c.host_id)):
        best_per_host.setdefault(candidate.host_id, candidate)
    bucket = list(best_per_host.values())[: max(bucket_size, k)]
    chosen: list[Candidate] = []
    while bucket and len(chosen) < k:
        # A host with no stake still gets a small chance, so newcomers can earn a record.
        weights = [stake_weight(c.stake) for c in bucket]
        index = rng.choices(range(len(bucket)), weights=weights)[0]
        chosen.append(bucket.pop(index))
    return chosen
