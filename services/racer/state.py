"""What one race knows: its attempts and the answer so far. Plain data, no transport and no
clock of its own: the race core (core.py) changes it, report.py reads it when the race is over."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from llooma.v1.common_pb2 import (
    ERROR_CODE_REQUEST_REJECTED,
    ChatMessage,
    ErrorCode,
    ErrorDetail,
    GenerationParams,
    Usage,
)
from llooma.v1.pipeline_pb2 import HostCandidate, TaskAssignment
from llooma.v1.race_pb2 import AttemptRole

# The racer's ceiling on a prompt's tokens, so a host cannot bill an invented prompt: no
# tokenizer needs more than one token per two characters, plus a chat template's markers (a
# generous allowance: an honest host's count must never be clipped).
PROMPT_CHARS_PER_TOKEN = 2
PROMPT_TOKENS_PER_MESSAGE = 16
PROMPT_TOKENS_PER_PROMPT = 16


@dataclass(slots=True)
class Attempt:
    attempt_id: str
    host: HostCandidate
    role: AttemptRole.ValueType
    launched_at: float
    first_token_at: float | None = None
    # When its last token came, and its longest pause between two tokens (its pace).
    last_token_at: float = 0.0
    longest_pause_s: float = 0.0
    # Token chunks the racer received from the host (not the host's own count).
    output_tokens: int = 0
    # Token chunks of this attempt relayed to the client.
    delivered: int = 0
    # UTF-8 bytes of this attempt's text and reasoning relayed to the client: the bound on
    # what an engine's own usage report may bill (every token is at least one byte).
    delivered_bytes: int = 0
    # The racer's ceiling on this attempt's prompt tokens (see prompt_tokens()).
    prompt_tokens: int = 0
    # Sent accepted, a token or finished: it kept its reservation.
    accepted: bool = False
    usage: Usage | None = None
    failed: bool = False
    # The engine refused the request (ERROR_CODE_REQUEST_REJECTED): the client's error.
    rejected: bool = False
    stalled: bool = False
    contributed: bool = False
    cancelled: bool = False
    # Protocol breaches (tokens past max_tokens, control tokens or characters, floods): each
    # counts as an error in S(h); a winner that broke one still won (its answer was delivered).
    violations: int = 0
    # Live at its first-token deadline with no token yet (see TaskSettlement.no_show).
    no_show: bool = False
    # Kept running after another host won, off the client's path, until its first token or
    # its first-token deadline (a silence probe, or a duel's loser): when that deadline is.
    watched_until: float | None = None
    # The usage the host reported when it finished, as claimed, and whether the claim broke
    # the usage rule (report.overclaimed; also counted in violations).
    claimed_usage: Usage | None = None
    usage_overclaimed: bool = False


class RaceFailed(Exception):
    def __init__(
        self, code: ErrorCode.ValueType, message: str, detail: ErrorDetail | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        # Passed to the client as is (an engine's refusal keeps its status and client code).
        self.detail = detail or ErrorDetail(code=code, message=message)


@dataclass(slots=True)
class Race:
    assignment: TaskAssignment
    started: float
    fallback_timeout_s: float
    attempts: dict[str, Attempt] = field(default_factory=dict)
    spare: list[HostCandidate] = field(default_factory=list)
    emitted: list[str] = field(default_factory=list)
    # Token chunks relayed to the client, across handovers: the answer's max_tokens budget.
    client_tokens: int = 0
    client_chars: int = 0
    # The racer's ceiling on the original prompt's tokens.
    prompt_tokens: int = 0
    first_token_at: float | None = None
    deadline_hit: bool = False
    continuations: int = 0
    # A tool-call fragment reached the client: its arguments are never continued elsewhere.
    tool_calls_sent: bool = False
    error: ErrorCode.ValueType = ErrorCode.ERROR_CODE_UNSPECIFIED
    winner: Attempt | None = None
    # A loser left running for a duel (services/racer/duel.py): not cancelled, not ours; and
    # the winner it duels (the duel is judged only if that winner's whole answer went out).
    dueling: Attempt | None = None
    duel_winner: Attempt | None = None
    # Taken over from a racer that stopped: the client's prompt was charged with the race
    # taken over (its winner's settlement), so this one's winner pays for its output only.
    resumed: bool = False

    @property
    def reply(self) -> str:
        return self.assignment.request.reply_subject

    @property
    def duel_clean(self) -> bool:
        """The duel's winner's whole answer reached the client untouched: it may be judged."""
        winner = self.duel_winner
        return (
            winner is not None
            and self.winner is winner
            and winner.usage is not None
            and self.continuations == 0
        )

    def take_spare(self, role: AttemptRole.ValueType) -> HostCandidate | None:
        """The next spare host for `role` (fallback or continuation) that has no live attempt,
        never broke this stream and was not yet tried in that role. A host that lost the
        first-token race (as a racer or as the fallback) stays available to continue."""
        for host in self.spare:
            attempts = [a for a in self.attempts.values() if a.host.host_id == host.host_id]
            live = any(not (a.failed or a.stalled or a.cancelled) for a in attempts)
            broke = any(a.stalled or (a.failed and a.contributed) for a in attempts)
            tried = any(a.role == role for a in attempts)
            if not (live or broke or tried):
                return host
        return None


def rejected(attempt: Attempt, detail: ErrorDetail) -> RaceFailed:
    """The engine refused the request itself: the race ends with the client's error as is."""
    attempt.rejected = True
    attempt.accepted = False
    return RaceFailed(ERROR_CODE_REQUEST_REJECTED, detail.message, detail)


def prompt_tokens(messages: Iterable[ChatMessage], params: GenerationParams) -> int:
    """The racer's ceiling on what a prompt can cost in tokens (hosts report usage, but a host's
    report is a claim): the messages, and the tool definitions and schema that reach the engine
    beside them, with the same allowance per character."""
    spliced = len(params.tools_json) + len(params.response_format_json)
    per_message = (len(m.content) // PROMPT_CHARS_PER_TOKEN for m in messages)
    return (
        PROMPT_TOKENS_PER_PROMPT
        + spliced // PROMPT_CHARS_PER_TOKEN
        + sum(tokens + PROMPT_TOKENS_PER_MESSAGE for tokens in per_message)
    )
