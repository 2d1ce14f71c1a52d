"""The picker: k distinct hosts, drawn by stake from the best-scoring bucket."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    host_id: str
    model: str
    score: float
    stake: float
    # The model's engine continues a trailing assistant message: the racer continues a
    # stream there by prefill, with no instructions.
    assistant_prefill: bool = False


# Stake is a weight in a draw: heartbeats are checked (llooma.heartbeats), and the draw still
# never takes a weight that is not a finite number within these bounds.
MIN_STAKE_WEIGHT = 1e-3
MAX_STAKE_WEIGHT = 1000.0


def stake_weight(stake: float) -> float:
    if not math.isfinite(stake):
        return MIN_STAKE_WEIGHT
    return min(max(stake, MIN_STAKE_WEIGHT), MAX_STAKE_WEIGHT)


MICROS_PER_CREDIT = 1_000_000


def ledger_stake(announced: float, locked_micros: int, unstaked: float) -> float:
    """The stake a host is drawn by: what it announced, but no more than the credits it has
    locked in the ledger, or the operator's floor for every host (`unstaked_host_stake`) if
    that is more. Announcing is free, so it only ever lowers the weight (or spreads it over
    models)."""
    return min(announced, max(locked_micros / MICROS_PER_CREDIT, unstaked))


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
