"""A race that outlives its racer, as data (no transport, no clock): the record a racer keeps
of each single-choice race while it runs (`RaceRecord`, written at each launch and change of
winner, never per token), and what another racer makes of it when the first stopped: the
dead race's attempts as far as they can be verified, to be settled, and the assignment under
which the answer is finished (docs/RELIABILITY.md, "A racer's death")."""

from __future__ import annotations

from llooma import subjects
from llooma.v1.pipeline_pb2 import TaskAssignment
from llooma.v1.race_pb2 import LaunchedAttempt, RaceRecord
from services.racer.state import Attempt, Race, prompt_tokens

# The resumed race's task id: the dead race's own, so its attempts, settled by their ids, are
# told apart from the resumed race's; one more suffix at each takeover.
RESUMED_TASK_SUFFIX = "-resumed"


def recorded(assignment: TaskAssignment) -> bool:
    """Only a single-choice race can be resumed from what its reader received: a client
    (direct answers) or the aggregator of a split request (a node's answer)."""
    request = assignment.request
    reader_counts = subjects.is_client_reply(request.reply_subject) or bool(request.node_id)
    return request.choices <= 1 and reader_counts


def race_record(race: Race, racer_id: str) -> RaceRecord:
    winner = race.winner
    record = RaceRecord(
        assignment=race.assignment,
        racer_instance_id=racer_id,
        attempts=[
            LaunchedAttempt(attempt_id=a.attempt_id, host=a.host, role=a.role, accepted=a.accepted)
            for a in race.attempts.values()
        ],
    )
    if winner is not None:
        record.winner_attempt_id = winner.attempt_id
        # The winner's part of the answer starts after what earlier hosts relayed.
        record.winner_from_tokens = max(0, race.client_tokens - winner.delivered)
    return record


def record_state(race: Race) -> tuple[int, str]:
    """What a record says that changes during a race: rewritten when this does."""
    winner = race.winner
    return len(race.attempts), winner.attempt_id if winner is not None else ""


def taken_over(record: RaceRecord, delivered_tokens: int, now: float) -> Race:
    """The dead racer's race as far as it can be verified, ready for report.py's settlements:
    its winner delivered what the client received since it took over (the ingress counted
    it), on the prompt ceiling (the host never reported its usage), and is paid and charged
    for that; every other attempt is a loser with no verified token (the dead racer's counts
    died with it), so it earns no fee. With nothing received, every attempt is such a loser."""
    race = Race(record.assignment, now, 0.0)
    request = record.assignment.request
    race.prompt_tokens = prompt_tokens(request.messages, request.params)
    for launched in record.attempts:
        attempt = Attempt(launched.attempt_id, launched.host, launched.role, now)
        attempt.accepted = launched.accepted
        attempt.cancelled = True
        attempt.prompt_tokens = race.prompt_tokens
        race.attempts[attempt.attempt_id] = attempt
    winner = race.attempts.get(record.winner_attempt_id)
    # A race whose client received nothing is run afresh (and charged there): no winner here.
    if winner is not None and delivered_tokens > 0:
        part = max(0, delivered_tokens - record.winner_from_tokens)
        winner.accepted = True
        winner.contributed = part > 0
        winner.delivered = winner.output_tokens = part
        winner.first_token_at = now
        race.winner = winner
        race.first_token_at = now
        race.client_tokens = delivered_tokens
    return race


def resumed_assignment(assignment: TaskAssignment) -> TaskAssignment:
    resumed = TaskAssignment()
    resumed.CopyFrom(assignment)
    resumed.task_id = assignment.task_id + RESUMED_TASK_SUFFIX
    return resumed
