"""What a finished race says: one settlement per attempt and one race event, built by pure
functions over the race's state (no transport, no clock: the caller passes the times)."""

from __future__ import annotations

from collections.abc import Iterable

from llooma.v1.common_pb2 import REQUEST_PATH_FALLBACK, GenerationParams, Usage
from llooma.v1.race_pb2 import ATTEMPT_ROLE_FALLBACK, AttemptReport, RaceEvent
from llooma.v1.settlement_pb2 import (
    ATTEMPT_OUTCOME_FAILED,
    ATTEMPT_OUTCOME_LOST,
    ATTEMPT_OUTCOME_REJECTED,
    ATTEMPT_OUTCOME_WON,
    TaskSettlement,
)
from services.racer.state import Attempt, Race

ATTEMPT_OUTCOME_NAMES: dict[int, str] = {
    ATTEMPT_OUTCOME_WON: "won",
    ATTEMPT_OUTCOME_LOST: "lost",
    ATTEMPT_OUTCOME_FAILED: "failed",
    ATTEMPT_OUTCOME_REJECTED: "rejected",
}

# An engine's count may exceed what reached the client by the tokens it held back: a matched
# stop string (never relayed) and its end-of-sequence token or two.
ENGINE_TOKENS_ALLOWANCE = 2

# The usage rule (docs/SECURITY.md): a host's completion claim may exceed the ceiling it is
# billed on (chunks counted, or relayed bytes plus held-back stop strings for an engine's own
# count) by this many tokens before it is a violation; beyond, no honest engine's count goes.
USAGE_CLAIM_SLACK_TOKENS = 8
# A prompt claim beyond this multiple of the racer's ceiling is absurd for the prompt sent (the
# ceiling already allows one token per two characters plus template markers).
PROMPT_CLAIM_ABSURD_FACTOR = 4


def output_ceiling(attempt: Attempt, reported_by_engine: bool, stop: Iterable[str]) -> int:
    """The most completion tokens a finished attempt can be billed: the chunks counted, or,
    when the engine reported its own usage, the UTF-8 bytes relayed (every token is at least
    one byte) plus a matched stop string and an end-of-sequence token or two it held back."""
    if not reported_by_engine:
        return attempt.output_tokens
    held_back = max((len(s.encode()) for s in stop), default=0) + ENGINE_TOKENS_ALLOWANCE
    return max(attempt.output_tokens, attempt.delivered_bytes + held_back)


def billed_usage(attempt: Attempt, reported: Usage, stop: Iterable[str]) -> Usage:
    """What a finished attempt is paid and charged: the host's claim, clamped. The prompt to the
    racer's ceiling; the output to `output_ceiling`, so an honest engine's count is never
    clipped while a lying host cannot bill for more than it delivered."""
    ceiling = output_ceiling(attempt, reported.reported_by_engine, stop)
    return Usage(
        input_tokens=min(reported.input_tokens, attempt.prompt_tokens),
        output_tokens=min(reported.output_tokens, ceiling),
        reported_by_engine=reported.reported_by_engine,
    )


def overclaimed(attempt: Attempt, reported: Usage, params: GenerationParams) -> bool:
    """The usage rule (docs/SECURITY.md): a host's own usage report is a violation when it
    claims more completion tokens than `output_ceiling` plus USAGE_CLAIM_SLACK_TOKENS, or more
    prompt tokens than PROMPT_CLAIM_ABSURD_FACTOR times what the prompt it was sent (its
    messages, tools and response format: `state.prompt_tokens`) can cost."""
    ceiling = output_ceiling(attempt, reported.reported_by_engine, params.stop)
    if reported.output_tokens > ceiling + USAGE_CLAIM_SLACK_TOKENS:
        return True
    return reported.input_tokens > PROMPT_CLAIM_ABSURD_FACTOR * attempt.prompt_tokens


def delivered_tokens(attempt: Attempt, usage: Usage | None) -> int:
    """The settlement's delivered tokens: chunks relayed, or the engine's clamped count."""
    if usage is not None and usage.reported_by_engine:
        return max(attempt.delivered, usage.output_tokens)
    return attempt.delivered


def paid_winner(race: Race) -> tuple[Attempt | None, Usage | None]:
    """The attempt settled WON and its usage: the finisher, or, when the stream ended early (the
    client left, or no host could continue it), the last one whose tokens reached the client."""
    if race.winner is not None and race.winner.usage is not None:
        return race.winner, race.winner.usage
    delivering = [a for a in race.attempts.values() if a.delivered]
    if not delivering:
        return None, None
    # Only what reached the client, on the racer's prompt ceiling (the host never said).
    return delivering[-1], Usage(
        input_tokens=race.prompt_tokens, output_tokens=delivering[-1].delivered
    )


def outcome(attempt: Attempt, paid: Attempt | None) -> int:
    """What the host did, for the race event and S(h): a partial winner that broke off is
    still a failure there, though it is paid for what it delivered; an engine's refusal is the
    client's error, not the host's."""
    if attempt.rejected:
        return ATTEMPT_OUTCOME_REJECTED
    if attempt.failed or attempt.stalled:
        return ATTEMPT_OUTCOME_FAILED
    if attempt is paid:
        return ATTEMPT_OUTCOME_WON
    if attempt.violations:
        return ATTEMPT_OUTCOME_FAILED
    return ATTEMPT_OUTCOME_LOST


def first_token_ms(attempt: Attempt) -> int:
    if attempt.first_token_at is None:
        return 0
    return int((attempt.first_token_at - attempt.launched_at) * 1000)


def attempt_usage(race: Race, attempt: Attempt) -> Usage:
    """What an attempt is settled on."""
    paid, usage = paid_winner(race)
    if attempt is paid and usage is not None:
        return usage
    return attempt.usage or Usage(output_tokens=attempt.output_tokens)


def settlements(race: Race, now: float, unix_nanos: int) -> list[TaskSettlement]:
    """One settlement per attempt (idempotent by attempt id downstream)."""
    request = race.assignment.request
    paid, paid_usage = paid_winner(race)
    # Priced by where the host came from, not its role: a continuation may run on a pool host.
    pool = {host.host_id for host in race.assignment.fallback}
    settled = []
    for attempt in race.attempts.values():
        usage = paid_usage if attempt is paid and paid_usage is not None else None
        if usage is not None and race.resumed:
            usage = Usage(
                output_tokens=usage.output_tokens, reported_by_engine=usage.reported_by_engine
            )
        usage = usage or attempt.usage or Usage(output_tokens=attempt.output_tokens)
        what = outcome(attempt, paid)
        settlement = TaskSettlement(
            attempt_id=attempt.attempt_id,
            request_id=request.request_id,
            task_id=race.assignment.task_id,
            host_id=attempt.host.host_id,
            model=attempt.host.model,
            # The paid winner is WON here even if it broke off: it is paid for its part; a
            # rejected attempt is LOST (nothing delivered, nothing owed, no host failure).
            outcome=_settled(what, attempt is paid),  # type: ignore[arg-type]
            usage=usage,
            first_token_ms=first_token_ms(attempt),
            duration_ms=int((now - attempt.launched_at) * 1000),
            finished_unix_nanos=unix_nanos,
            api_key_id=request.api_key_id,
            requested_model=request.model,
            fallback=attempt.host.host_id in pool,
            accepted=attempt.accepted,
            delivered_tokens=delivered_tokens(attempt, usage),
            violations=attempt.violations,
            # A late first token still delivered: slow, not absent.
            no_show=attempt.no_show and attempt.first_token_at is None,
            usage_overclaimed=attempt.usage_overclaimed,
        )
        if attempt.claimed_usage is not None:
            settlement.claimed_usage.CopyFrom(attempt.claimed_usage)
        if paid is not None and paid_usage is not None:
            settlement.winner_model = paid.host.model
            settlement.winner_output_tokens = paid_usage.output_tokens
            settlement.winner_fallback = paid.host.host_id in pool
        settled.append(settlement)
    return settled


def _settled(what: int, paid: bool) -> int:
    if paid:
        return ATTEMPT_OUTCOME_WON
    return ATTEMPT_OUTCOME_LOST if what == ATTEMPT_OUTCOME_REJECTED else what


def race_event(race: Race, now: float, unix_nanos: int) -> RaceEvent:
    """What the racer saw, for metrics, the dispatcher's host stats and accounting."""
    request = race.assignment.request
    paid, _ = paid_winner(race)
    winner = race.winner
    reports = [
        AttemptReport(
            attempt_id=attempt.attempt_id,
            host_id=attempt.host.host_id,
            model=attempt.host.model,
            role=attempt.role,
            outcome=outcome(attempt, paid),  # type: ignore[arg-type]
            launched_after_ms=int((attempt.launched_at - race.started) * 1000),
            first_token_ms=first_token_ms(attempt),
            output_tokens=attempt.output_tokens,
            stalled=attempt.stalled,
            violations=attempt.violations,
            accepted=attempt.accepted,
        )
        for attempt in race.attempts.values()
    ]
    return RaceEvent(
        request_id=request.request_id,
        task_id=race.assignment.task_id,
        model=request.model,
        path=(
            REQUEST_PATH_FALLBACK
            if winner is not None and winner.role == ATTEMPT_ROLE_FALLBACK
            else request.path
        ),
        attempts=reports,
        winner_host_id=winner.host.host_id if winner is not None else "",
        first_token_ms=(
            int((race.first_token_at - race.started) * 1000) if race.first_token_at else 0
        ),
        first_token_deadline_hit=race.deadline_hit,
        continuations=race.continuations,
        succeeded=succeeded(race),
        error=race.error,
        finished_unix_nanos=unix_nanos,
        output_tokens=race.client_tokens,
        duration_ms=int((now - race.started) * 1000),
    )


def succeeded(race: Race) -> bool:
    return race.winner is not None and race.winner.usage is not None
