"""What the race core asks of the world (core.py returns these; race.py carries them out over
NATS, tests in memory), and what it asks of the duel runner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeAlias

from llooma.duel import Contender, DuelOffer
from llooma.v1.host_pb2 import HostTask
from llooma.v1.pipeline_pb2 import ClientEvent
from services.racer.state import Attempt, Race


@dataclass(frozen=True, slots=True)
class Launch:
    attempt: Attempt
    task: HostTask


@dataclass(frozen=True, slots=True)
class Cancel:
    attempt: Attempt


@dataclass(frozen=True, slots=True)
class Emit:
    event: ClientEvent


@dataclass(frozen=True, slots=True)
class HandToDuel:
    """This loser's stream now belongs to a duel: route its chunks there, never cancel it."""

    attempt: Attempt


@dataclass(frozen=True, slots=True)
class CloseDuel:
    """Judge the duel on the winner's whole answer, or drop it (winner_text None)."""

    loser: Attempt
    winner_text: str | None


@dataclass(frozen=True, slots=True)
class Settle:
    race: Race


Command: TypeAlias = Launch | Cancel | Emit | HandToDuel | CloseDuel | Settle


class DuelSampler(Protocol):
    """Duels (services/racer/duel.py) as the core sees them: at the first token, maybe take one
    loser's stream for a duel; returns the attempt id it took."""

    def open(self, offer: DuelOffer) -> str | None: ...


def duel_offer(race: Race, winner: Attempt) -> DuelOffer:
    """The race at its first token, as a duel sees it: the winner and the losers still running
    on other hosts."""
    losers = [
        a
        for a in race.attempts.values()
        if a is not winner
        and not (a.failed or a.cancelled or a.stalled)
        and a.host.host_id != winner.host.host_id
    ]
    return DuelOffer(
        task_id=race.assignment.task_id,
        request=race.assignment.request,
        winner=_contender(winner),
        losers=tuple(_contender(a) for a in losers),
    )


def _contender(attempt: Attempt) -> Contender:
    return Contender(attempt.attempt_id, attempt.host.host_id, attempt.host.model)
