"""One task's race (paper II-B, III): the first host to deliver a token wins and the rest are
told to stop; no token by the deadline δ sends the task to the fallback pool; a stream that
stalls or fails continues on another host from the text already emitted (II-D)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError
from opentelemetry.trace import Span, SpanKind

from llooma import bus, subjects, tracing
from llooma.continuation import (
    OverlapFilter,
    continuation_messages,
    detect_format,
    safe_prefix,
    tail_window,
)
from llooma.service import Service
from llooma.v1.common_pb2 import (
    ERROR_CODE_DEADLINE_EXCEEDED,
    ERROR_CODE_HOST_BUSY,
    ERROR_CODE_HOST_FAILED,
    ERROR_CODE_REQUEST_REJECTED,
    REQUEST_PATH_FALLBACK,
    ChatMessage,
    ErrorCode,
    ErrorDetail,
    GenerationParams,
    Usage,
)
from llooma.v1.host_pb2 import CancelTask, HostChunk, HostFinished, HostTask
from llooma.v1.pipeline_pb2 import (
    ClientDelta,
    ClientEvent,
    ClientFinished,
    ClientStarted,
    HostCandidate,
    TaskAssignment,
)
from llooma.v1.race_pb2 import (
    ATTEMPT_ROLE_CONTINUATION,
    ATTEMPT_ROLE_FALLBACK,
    ATTEMPT_ROLE_HEDGE,
    ATTEMPT_ROLE_RACER,
    AttemptReport,
    AttemptRole,
    RaceEvent,
)
from llooma.v1.settlement_pb2 import (
    ATTEMPT_OUTCOME_FAILED,
    ATTEMPT_OUTCOME_LOST,
    ATTEMPT_OUTCOME_REJECTED,
    ATTEMPT_OUTCOME_WON,
    TaskSettlement,
)
from services.racer.containment import MAX_CHARS_PER_TOKEN, MAX_CHUNK_CHARS, Sanitizer
from services.racer.duel import Duels

log = logging.getLogger(__name__)

ATTEMPT_OUTCOME_NAMES: dict[int, str] = {
    ATTEMPT_OUTCOME_WON: "won",
    ATTEMPT_OUTCOME_LOST: "lost",
    ATTEMPT_OUTCOME_FAILED: "failed",
    ATTEMPT_OUTCOME_REJECTED: "rejected",
}

# How long a settlement or race event publish is retried while NATS is away.
PUBLISH_RETRY_S = 60.0
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
    span: Span | None = None
    # Protocol breaches (tokens past max_tokens, control tokens or characters, floods): each
    # counts as an error in S(h); a winner that broke one still won (its answer was delivered).
    violations: int = 0


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
    inbox: asyncio.Queue[tuple[Attempt, HostChunk]] = field(default_factory=asyncio.Queue)
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
    error: ErrorCode.ValueType = ErrorCode.ERROR_CODE_UNSPECIFIED
    winner: Attempt | None = None
    span: Span | None = None
    # A loser left running for a duel (services/racer/duel.py): not cancelled, not ours.
    dueling: Attempt | None = None

    @property
    def reply(self) -> str:
        return self.assignment.request.reply_subject


class Racer:
    """Runs races; one wildcard subscription routes every host chunk to its race."""

    _nc: Client
    _js: JetStreamContext

    def __init__(
        self,
        instance_id: str,
        *,
        max_continuations: int = 2,
        fallback_first_token_ms: int = 10_000,
        duels: Duels | None = None,
    ) -> None:
        self._instance_id = instance_id
        self._duels = duels
        self._max_continuations = max_continuations
        self._fallback_timeout_s = fallback_first_token_ms / 1000.0
        self._by_attempt: dict[str, tuple[Race, Attempt]] = {}
        # A split request runs one race per node, all under the request's id.
        self._by_request: dict[str, set[asyncio.Task[None]]] = {}

    async def start(self, service: Service) -> None:
        self._nc = service.nc
        self._js = service.js
        prefix = subjects.host_reply_prefix(self._instance_id)
        await service.subscribe(f"{prefix}.*", self._on_host_chunk)
        await service.subscribe(subjects.REQUEST_CANCEL_ANY, self._on_request_cancel)

    async def _on_host_chunk(self, msg: Msg) -> None:
        routed = self._by_attempt.get(msg.subject.rpartition(".")[2])
        if routed is None:
            # A duel's (its loser's or a judge's), or late tokens of an attempt already settled.
            if self._duels is not None:
                await self._duels.on_chunk(msg)
            return
        race, attempt = routed
        try:
            chunk = HostChunk.FromString(msg.data)
        except Exception:
            chunk = HostChunk(failed=ErrorDetail(code=ERROR_CODE_HOST_FAILED, message="garbled"))
        race.inbox.put_nowait((attempt, chunk))

    async def _on_request_cancel(self, msg: Msg) -> None:
        for task in self._by_request.get(msg.subject.split(".")[-2], set()):
            task.cancel()

    async def run(self, assignment: TaskAssignment) -> None:
        request_id = assignment.request.request_id
        task = asyncio.current_task()
        assert task is not None
        self._by_request.setdefault(request_id, set()).add(task)
        race = Race(assignment, time.monotonic(), self._fallback_timeout_s)
        race.prompt_tokens = prompt_tokens(assignment.request.messages)
        if tracing.enabled():
            race.span = tracing.start_span(
                f"race {assignment.request.model}",
                attributes={
                    **tracing.chat_attributes(assignment.request.model),
                    "llooma.request_id": request_id,
                    "llooma.task_id": assignment.task_id,
                },
            )
        # The fallback pool first; raced hosts that said no may still continue a stream.
        race.spare = [*assignment.fallback, *assignment.hosts]
        try:
            await self._race(race)
        except asyncio.CancelledError:
            log.debug("request %s cancelled by its client", request_id)
        finally:
            running = self._by_request.get(request_id, set())
            running.discard(task)
            if not running:
                self._by_request.pop(request_id, None)
            if self._duels is not None:
                self._duels.close(race)
            await self._cancel_all(race, keep=None)
            for attempt_id in race.attempts:
                self._by_attempt.pop(attempt_id, None)
            await self._report(race)

    # -- launching -------------------------------------------------------------------------

    async def _launch(
        self,
        race: Race,
        host: HostCandidate,
        role: AttemptRole.ValueType,
        messages: list[ChatMessage] | None = None,
    ) -> Attempt:
        attempt = Attempt(uuid.uuid4().hex, host, role, time.monotonic())
        if tracing.enabled():
            attempt.span = tracing.start_span(
                f"chat {host.model}",
                kind=SpanKind.CLIENT,
                parent=race.span,
                attributes={
                    **tracing.chat_attributes(host.model),
                    "llooma.attempt_id": attempt.attempt_id,
                    "llooma.host_id": host.host_id,
                    "llooma.attempt_role": AttemptRole.Name(role),
                },
            )
        race.attempts[attempt.attempt_id] = attempt
        self._by_attempt[attempt.attempt_id] = (race, attempt)
        request = race.assignment.request
        params = request.params
        if messages is None:
            attempt.prompt_tokens = race.prompt_tokens
        else:
            attempt.prompt_tokens = prompt_tokens(messages)
            if params.max_tokens:
                # max_tokens is the answer's: a handover gets only what is left of it.
                params = GenerationParams()
                params.CopyFrom(request.params)
                params.max_tokens = max(1, request.params.max_tokens - race.client_tokens)
        task = HostTask(
            attempt_id=attempt.attempt_id,
            model=host.model,
            messages=messages if messages is not None else request.messages,
            params=params,
        )
        await self._nc.publish(
            subjects.host_task(host.model, host.host_id),
            task.SerializeToString(),
            reply=subjects.host_reply(self._instance_id, attempt.attempt_id),
            headers=tracing.headers_for(attempt.span),
        )
        return attempt

    def _take_spare(self, race: Race) -> HostCandidate | None:
        """The next spare host that has no live attempt and never broke this stream."""
        for index, host in enumerate(race.spare):
            attempts = [a for a in race.attempts.values() if a.host.host_id == host.host_id]
            live = any(not (a.failed or a.stalled or a.cancelled) for a in attempts)
            broke = any(a.stalled or (a.failed and a.contributed) for a in attempts)
            if not live and not broke:
                del race.spare[index]
                return host
        return None

    # -- the race --------------------------------------------------------------------------

    async def _race(self, race: Race) -> None:
        try:
            winner, first = await self._first_token(race)
            race.winner = winner
            race.first_token_at = winner.first_token_at
            if self._duels is not None:
                race.dueling = self._duels.open(race, winner, self._by_attempt)
            await self._cancel_all(race, keep=winner)
            path = race.assignment.request.path
            if winner.role == ATTEMPT_ROLE_FALLBACK:
                path = REQUEST_PATH_FALLBACK
            started = ClientStarted(
                path=path,
                model=winner.host.model,
                plan_decision=race.assignment.request.plan.decision,
                host_id=winner.host.host_id,
            )
            await self._emit(race.reply, ClientEvent(started=started))
            await self._stream(race, winner, first)
        except RaceFailed as failure:
            race.error = failure.code
            await self._emit(race.reply, ClientEvent(failed=failure.detail))

    async def _first_token(self, race: Race) -> tuple[Attempt, HostChunk]:
        """Launch the racers (hedged ones later), then wait for the first token; past the
        deadline δ, a fallback host joins; past the fallback's own limit, give up."""
        assignment = race.assignment
        hosts = list(assignment.hosts)
        hedge_s = assignment.hedge_delay_ms / 1000.0
        await self._launch(race, hosts[0], ATTEMPT_ROLE_RACER)
        hedged = hosts[1:] if hedge_s > 0 else []
        for host in hosts[1:] if hedge_s <= 0 else []:
            await self._launch(race, host, ATTEMPT_ROLE_RACER)
        deadline_s = assignment.first_token_deadline_ms / 1000.0
        give_up_at = race.started + deadline_s + race.fallback_timeout_s
        busy_replies = 0
        while True:
            now = time.monotonic()
            wakeups = [give_up_at]
            if hedged:
                wakeups.append(race.started + hedge_s)
            if not race.deadline_hit:
                wakeups.append(race.started + deadline_s)
            try:
                async with asyncio.timeout(max(0.0, min(wakeups) - now)):
                    attempt, chunk = await race.inbox.get()
            except TimeoutError:
                now = time.monotonic()
                if hedged and now >= race.started + hedge_s:
                    for host in hedged:
                        await self._launch(race, host, ATTEMPT_ROLE_HEDGE)
                    hedged = []
                if not race.deadline_hit and now >= race.started + deadline_s:
                    race.deadline_hit = True
                    await self._launch_fallback(race)
                if now >= give_up_at:
                    raise RaceFailed(
                        ERROR_CODE_DEADLINE_EXCEEDED,
                        f"no host produced a first token within {deadline_s:.3f} s "
                        "and the fallback did not either",
                    ) from None
                continue
            kind = chunk.WhichOneof("event")
            if kind == "accepted":
                attempt.accepted = True
                continue
            if kind in ("token", "finished"):
                attempt.accepted = True
                attempt.first_token_at = time.monotonic()
                if kind == "token":
                    attempt.output_tokens += 1
                return attempt, chunk
            if kind == "failed":
                if chunk.failed.code == ERROR_CODE_REQUEST_REJECTED:
                    raise _rejected(attempt, chunk.failed)
                attempt.failed = True
                busy_replies += chunk.failed.code == ERROR_CODE_HOST_BUSY
                if any(not a.failed for a in race.attempts.values()):
                    continue
                # Every host so far said no: do not wait for a timer to try the next.
                if hedged:
                    for host in hedged:
                        await self._launch(race, host, ATTEMPT_ROLE_HEDGE)
                    hedged = []
                elif not await self._launch_fallback(race):
                    code = ERROR_CODE_HOST_BUSY if busy_replies else ERROR_CODE_HOST_FAILED
                    raise RaceFailed(code, f"every raced host failed: {chunk.failed.message}")

    async def _launch_fallback(self, race: Race) -> bool:
        host = self._take_spare(race)
        if host is None:
            return False
        await self._launch(race, host, ATTEMPT_ROLE_FALLBACK)
        return True

    # -- streaming and continuation ----------------------------------------------------------

    async def _stream(self, race: Race, winner: Attempt, first: HostChunk) -> None:
        """Relay the winner's chunks; tokens already queued go out as one delta (no waiting).
        A stall or failure hands the stream to a continuation host."""
        stall_s = race.assignment.stall_deadline_ms / 1000.0
        chunk: HostChunk | None = first
        relay = _Relay()
        sanitizer = Sanitizer()
        thoughts = Sanitizer()
        max_tokens = race.assignment.request.params.max_tokens
        max_chars = max_tokens * MAX_CHARS_PER_TOKEN
        text: list[str] = []
        reasoning: list[str] = []
        while True:
            if chunk is None:
                await self._flush(race, text, reasoning)
                try:
                    chunk = await self._next_from(race, winner, stall_s)
                except TimeoutError:
                    winner.stalled = True
                    winner, chunk, relay = await self._continue(race, winner, "stalled")
                    sanitizer, thoughts = Sanitizer(), Sanitizer()
                    continue
            kind = chunk.WhichOneof("event")
            if kind == "token" and max_tokens and race.client_tokens >= max_tokens:
                # Past the answer's budget: cut here, stop the host, count it against it.
                winner.output_tokens -= 1  # the cut token is not the host's
                chunk = await self._cut(winner)
                continue
            if kind == "token":
                winner.contributed = True
                race.client_tokens += 1
                winner.delivered += 1
                token = chunk.token
                raw = token.text
                if len(raw) > MAX_CHUNK_CHARS:
                    winner.violations += 1
                    raw = raw[:MAX_CHUNK_CHARS]
                piece = relay.feed(sanitizer.feed(raw)) if raw else ""
                thought = ""
                if token.reasoning:
                    raw = token.reasoning
                    if len(raw) > MAX_CHUNK_CHARS:
                        winner.violations += 1
                        raw = raw[:MAX_CHUNK_CHARS]
                    thought = thoughts.feed(raw)
                if sanitizer.removed or thoughts.removed:
                    winner.violations += 1
                    sanitizer.removed = thoughts.removed = 0
                if max_chars and race.client_chars + len(piece) + len(thought) > max_chars:
                    room = max_chars - race.client_chars
                    thought = thought[:room]
                    piece = piece[: room - len(thought)]
                    _add(winner, reasoning, thought)
                    _add(winner, text, piece)
                    race.client_chars = max_chars
                    chunk = await self._cut(winner)
                    continue
                race.client_chars += len(piece) + len(thought)
                _add(winner, reasoning, thought)
                _add(winner, text, piece)
            elif kind == "finished":
                tail = relay.feed(sanitizer.flush()) + relay.flush()
                thought = thoughts.flush()
                if sanitizer.removed or thoughts.removed:
                    winner.violations += 1
                    sanitizer.removed = thoughts.removed = 0
                if max_chars:
                    room = max(0, max_chars - race.client_chars)
                    thought = thought[:room]
                    tail = tail[: room - len(thought)]
                _add(winner, reasoning, thought)
                _add(winner, text, tail)
                await self._flush(race, text, reasoning)
                winner.usage = billed_usage(
                    winner, chunk.finished.usage, race.assignment.request.params.stop
                )
                if winner.role == ATTEMPT_ROLE_CONTINUATION and winner.prompt_tokens:
                    # The user asked the original prompt; the continuation's carries our prefix.
                    winner.usage.input_tokens = min(
                        race.prompt_tokens,
                        winner.usage.input_tokens * race.prompt_tokens // winner.prompt_tokens,
                    )
                output = race.client_tokens
                if winner.usage.reported_by_engine:
                    # The engine's own count for its part, the chunks relayed for earlier ones.
                    output += winner.usage.output_tokens - winner.delivered
                usage = Usage(input_tokens=winner.usage.input_tokens, output_tokens=output)
                finished = ClientFinished(finish_reason=chunk.finished.finish_reason, usage=usage)
                if race.span is not None:
                    tracing.record_usage(
                        race.span,
                        usage.input_tokens,
                        usage.output_tokens,
                        chunk.finished.finish_reason,
                    )
                await self._emit(race.reply, ClientEvent(finished=finished))
                race.winner = winner
                return
            else:
                await self._flush(race, text, reasoning)
                if chunk.failed.code == ERROR_CODE_REQUEST_REJECTED:
                    raise _rejected(winner, chunk.failed)
                winner.failed = True
                winner, chunk, relay = await self._continue(race, winner, chunk.failed.message)
                sanitizer, thoughts = Sanitizer(), Sanitizer()
                continue
            chunk = self._queued_from(race, winner)

    async def _cut(self, attempt: Attempt) -> HostChunk:
        """Stop a host that broke the answer's budget; the answer ends there, "length"."""
        attempt.violations += 1
        await self._cancel(attempt)
        # The host never reported this stream's usage: what was counted, and the prompt ceiling.
        usage = Usage(input_tokens=attempt.prompt_tokens, output_tokens=attempt.output_tokens)
        return HostChunk(finished=HostFinished(finish_reason="length", usage=usage))

    async def _flush(self, race: Race, text: list[str], reasoning: list[str]) -> None:
        if not (text or reasoning):
            return
        delta = ClientDelta()
        if text:
            delta.text = "".join(text)
            # Only the answer is continued on a handover, not the reasoning before it.
            race.emitted.append(delta.text)
            text.clear()
        if reasoning:
            delta.reasoning = "".join(reasoning)
            reasoning.clear()
        await self._emit(race.reply, ClientEvent(delta=delta))

    async def _continue(
        self, race: Race, broken: Attempt, why: str
    ) -> tuple[Attempt, HostChunk, _Relay]:
        """Start a fallback host on the emitted prefix; returns it with its first chunk."""
        await self._cancel(broken)
        if race.continuations >= self._max_continuations:
            raise RaceFailed(ERROR_CODE_HOST_FAILED, f"the stream broke ({why}); no retries left")
        while True:
            host = self._take_spare(race)
            if host is None:
                raise RaceFailed(
                    ERROR_CODE_HOST_FAILED, f"the stream broke ({why}) and no host can continue it"
                )
            race.continuations += 1
            emitted = "".join(race.emitted)
            fmt = detect_format(emitted)
            prefix = safe_prefix(emitted, fmt)
            tail = tail_window(prefix)
            original = [(m.role, m.content) for m in race.assignment.request.messages]
            messages = merge_turns(continuation_messages(original, prefix, fmt, tail))
            attempt = await self._launch(race, host, ATTEMPT_ROLE_CONTINUATION, messages)
            try:
                async with asyncio.timeout(race.fallback_timeout_s):
                    while True:
                        chunk = self._count(attempt, *await race.inbox.get())
                        if chunk is None:
                            continue
                        if chunk.HasField("failed"):
                            attempt.failed = True
                            # Our continuation prompt, not the client's: refused, not failed.
                            attempt.rejected = chunk.failed.code == ERROR_CODE_REQUEST_REJECTED
                            break
                        if attempt.first_token_at is None:
                            attempt.first_token_at = time.monotonic()
                        return attempt, chunk, _Relay(tail, emitted[len(prefix) :])
            except TimeoutError:
                attempt.stalled = True
            await self._cancel(attempt)

    def _queued_from(self, race: Race, winner: Attempt) -> HostChunk | None:
        """The winner's next chunk if one is already queued, else None."""
        while not race.inbox.empty():
            chunk = self._count(winner, *race.inbox.get_nowait())
            if chunk is not None:
                return chunk
        return None

    @staticmethod
    def _count(winner: Attempt, attempt: Attempt, chunk: HostChunk) -> HostChunk | None:
        """Count a token to its attempt; return the chunk if it is the winner's (an accepted
        is only noted: it is no token, and no failure either)."""
        kind = chunk.WhichOneof("event")
        if kind == "accepted":
            attempt.accepted = True
            return None
        if kind == "token":
            attempt.accepted = True
            attempt.output_tokens += 1
        elif kind == "finished":
            attempt.accepted = True
        elif attempt is not winner and chunk.failed.code == ERROR_CODE_HOST_BUSY:
            # A "busy" that lands after the race was won still says the host's load was false.
            attempt.failed = True
        return chunk if attempt is winner else None

    async def _next_from(self, race: Race, winner: Attempt, stall_s: float) -> HostChunk:
        async with asyncio.timeout(stall_s):
            while True:
                chunk = self._count(winner, *await race.inbox.get())
                if chunk is not None:
                    return chunk

    # -- outputs ---------------------------------------------------------------------------

    async def _emit(self, subject: str, event: ClientEvent) -> None:
        await self._nc.publish(subject, event.SerializeToString())

    async def _cancel(self, attempt: Attempt) -> None:
        attempt.cancelled = True
        with contextlib.suppress(Exception):
            await self._nc.publish(
                subjects.host_cancel(attempt.host.host_id),
                CancelTask(attempt_id=attempt.attempt_id).SerializeToString(),
            )

    async def _cancel_all(self, race: Race, keep: Attempt | None) -> None:
        for attempt in race.attempts.values():
            if (
                attempt is not keep
                and attempt is not race.dueling
                and attempt.usage is None
                and not attempt.failed
            ):
                await self._cancel(attempt)

    @staticmethod
    def _paid_winner(race: Race) -> Attempt | None:
        """The attempt settled WON: the finisher, or, when the stream ended early (the client
        left, or no host could continue it), the last one whose tokens reached the client."""
        if race.winner is not None and race.winner.usage is not None:
            return race.winner
        delivering = [a for a in race.attempts.values() if a.delivered]
        if not delivering:
            return None
        paid = delivering[-1]
        # Only what reached the client, on the racer's prompt ceiling (the host never said).
        paid.usage = Usage(input_tokens=race.prompt_tokens, output_tokens=paid.delivered)
        return paid

    @staticmethod
    def _outcome(attempt: Attempt, paid: Attempt | None) -> int:
        """What the host did, for the race event and S(h): a partial winner that broke off is
        still a failure there, though it is paid for what it delivered."""
        if attempt.rejected:
            return ATTEMPT_OUTCOME_REJECTED
        if attempt.failed or attempt.stalled:
            return ATTEMPT_OUTCOME_FAILED
        if attempt is paid:
            return ATTEMPT_OUTCOME_WON
        if attempt.violations:
            return ATTEMPT_OUTCOME_FAILED
        return ATTEMPT_OUTCOME_LOST

    async def _report(self, race: Race) -> None:
        """Settle every attempt and publish the race event (both idempotent by id)."""
        request = race.assignment.request
        now = time.monotonic()
        reports = []
        settles = []
        succeeded = race.winner is not None and race.winner.usage is not None
        paid = self._paid_winner(race)
        # Priced by where the host came from, not its role: a continuation may run on a pool host.
        pool = {host.host_id for host in race.assignment.fallback}
        for attempt in race.attempts.values():
            first_ms = (
                int((attempt.first_token_at - attempt.launched_at) * 1000)
                if attempt.first_token_at
                else 0
            )
            outcome = self._outcome(attempt, paid)
            usage = attempt.usage or Usage(output_tokens=attempt.output_tokens)
            reports.append(
                AttemptReport(
                    attempt_id=attempt.attempt_id,
                    host_id=attempt.host.host_id,
                    model=attempt.host.model,
                    role=attempt.role,
                    outcome=outcome,  # type: ignore[arg-type]
                    launched_after_ms=int((attempt.launched_at - race.started) * 1000),
                    first_token_ms=first_ms,
                    output_tokens=attempt.output_tokens,
                    stalled=attempt.stalled,
                    violations=attempt.violations,
                    accepted=attempt.accepted,
                )
            )
            settlement = TaskSettlement(
                attempt_id=attempt.attempt_id,
                request_id=request.request_id,
                task_id=race.assignment.task_id,
                host_id=attempt.host.host_id,
                model=attempt.host.model,
                # The paid winner is WON here even if it broke off: it is paid for its part; a
                # rejected attempt is LOST (nothing delivered, nothing owed, no host failure).
                outcome=settled_outcome(outcome, attempt is paid),  # type: ignore[arg-type]
                usage=usage,
                first_token_ms=first_ms,
                duration_ms=int((now - attempt.launched_at) * 1000),
                finished_unix_nanos=time.time_ns(),
                api_key_id=request.api_key_id,
                requested_model=request.model,
                fallback=attempt.host.host_id in pool,
                accepted=attempt.accepted,
                delivered_tokens=delivered_tokens(attempt),
                violations=attempt.violations,
            )
            if paid is not None and paid.usage is not None:
                settlement.winner_model = paid.host.model
                settlement.winner_output_tokens = paid.usage.output_tokens
                settlement.winner_fallback = paid.host.host_id in pool
            settles.append(self._settle(attempt, settlement, outcome, first_ms))
        # Concurrently: one attempt's retries while NATS is away do not hold up the others.
        await asyncio.gather(*settles)
        winner = race.winner
        event = RaceEvent(
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
            succeeded=succeeded,
            error=race.error,
            finished_unix_nanos=time.time_ns(),
            output_tokens=race.client_tokens,
            duration_ms=int((now - race.started) * 1000),
        )
        with tracing.within(race.span):
            await self._publish(
                subjects.RACE_EVENT, event.SerializeToString(), race.assignment.task_id
            )
        if race.span is not None:
            race.span.set_attributes(
                {
                    "llooma.winner_host_id": event.winner_host_id,
                    "llooma.continuations": race.continuations,
                    "llooma.first_token_deadline_hit": race.deadline_hit,
                }
            )
            if winner is not None:
                race.span.set_attribute("gen_ai.response.model", winner.host.model)
        tracing.end_span(race.span, error="" if succeeded else ErrorCode.Name(race.error))

    async def _settle(
        self, attempt: Attempt, settlement: TaskSettlement, outcome: int, first_ms: int
    ) -> None:
        # The settlement carries its attempt's traceparent: the ledger's span joins the trace.
        with tracing.within(attempt.span):
            await self._publish(
                subjects.SETTLEMENT_TASK, settlement.SerializeToString(), attempt.attempt_id
            )
        _end_attempt_span(attempt, outcome, first_ms)

    async def _publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        # A settlement must outlive a NATS restart: retry (idempotent by id) until it is back.
        give_up_at = time.monotonic() + PUBLISH_RETRY_S
        delay_s = 0.1
        while True:
            try:
                await bus.hand_off(self._js, subject, payload, msg_id)
                return
            except BadRequestError:
                # The stream refused this message itself: resending cannot change its mind.
                log.exception("%s refused for %s", subject, msg_id)
                return
            except Exception:
                if time.monotonic() > give_up_at:
                    log.exception("%s not published for %s", subject, msg_id)
                    return
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)


def _end_attempt_span(attempt: Attempt, outcome: int, first_token_ms: int) -> None:
    span = attempt.span
    if span is None:
        return
    span.set_attributes(
        {
            "llooma.outcome": ATTEMPT_OUTCOME_NAMES.get(outcome, "failed"),
            "llooma.first_token_ms": first_token_ms,
            "llooma.stalled": attempt.stalled,
        }
    )
    if attempt.usage is not None:
        tracing.record_usage(span, attempt.usage.input_tokens, attempt.usage.output_tokens)
    else:
        span.set_attribute("gen_ai.usage.output_tokens", attempt.output_tokens)
    tracing.end_span(span, error="attempt_failed" if attempt.failed else "")


def _add(attempt: Attempt, pieces: list[str], piece: str) -> None:
    if piece:
        pieces.append(piece)
        attempt.delivered_bytes += len(piece.encode())


def _rejected(attempt: Attempt, detail: ErrorDetail) -> RaceFailed:
    """The engine refused the request itself: the race ends with the client's error as is."""
    attempt.rejected = True
    attempt.accepted = False
    return RaceFailed(ERROR_CODE_REQUEST_REJECTED, detail.message, detail)


def settled_outcome(outcome: int, paid: bool) -> int:
    if paid:
        return ATTEMPT_OUTCOME_WON
    return ATTEMPT_OUTCOME_LOST if outcome == ATTEMPT_OUTCOME_REJECTED else outcome


# An engine's count may exceed what reached the client by the tokens it held back: a matched
# stop string (never relayed) and its end-of-sequence token or two.
ENGINE_TOKENS_ALLOWANCE = 2


def billed_usage(attempt: Attempt, reported: Usage, stop: Iterable[str]) -> Usage:
    """What a finished attempt is paid and charged: the host's claim, clamped. The prompt to the
    racer's ceiling; the output to the chunks counted, or, when the engine reported its own
    usage, to the UTF-8 bytes relayed (every token is at least one byte), so an honest engine's
    count is never clipped while a lying host cannot bill for more than it delivered."""
    if reported.reported_by_engine:
        held_back = max((len(s.encode()) for s in stop), default=0) + ENGINE_TOKENS_ALLOWANCE
        ceiling = max(attempt.output_tokens, attempt.delivered_bytes + held_back)
    else:
        ceiling = attempt.output_tokens
    return Usage(
        input_tokens=min(reported.input_tokens, attempt.prompt_tokens),
        output_tokens=min(reported.output_tokens, ceiling),
        reported_by_engine=reported.reported_by_engine,
    )


def delivered_tokens(attempt: Attempt) -> int:
    """The settlement's delivered tokens: chunks relayed, or the engine's clamped count."""
    if attempt.usage is not None and attempt.usage.reported_by_engine:
        return max(attempt.delivered, attempt.usage.output_tokens)
    return attempt.delivered


def prompt_tokens(messages: Iterable[ChatMessage]) -> int:
    """The racer's ceiling on what a prompt can cost in tokens (hosts report usage, but a host's
    report is a claim)."""
    return PROMPT_TOKENS_PER_PROMPT + sum(
        len(m.content) // PROMPT_CHARS_PER_TOKEN + PROMPT_TOKENS_PER_MESSAGE for m in messages
    )


def merge_turns(turns: list[tuple[str, str]]) -> list[ChatMessage]:
    """Join consecutive turns of one role: chat templates that insist on alternating user and
    assistant turns reject two user messages in a row."""
    merged: list[ChatMessage] = []
    for role, content in turns:
        if merged and merged[-1].role == role:
            merged[-1].content += "\n\n" + content
        else:
            merged.append(ChatMessage(role=role, content=content))
    return merged


class _Relay:
    """Passes a stream's text to the client; after a continuation, drops what repeats the
    preserved tail and the part the client already saw past the safe prefix."""

    def __init__(self, tail: str = "", dangling: str = "") -> None:
        self._overlap = OverlapFilter(tail) if tail else None
        self._dangling = dangling
        self._held = ""

    def feed(self, text: str) -> str:
        if self._overlap is not None:
            text = self._overlap.feed(text)
        return self._reconcile(text)

    def flush(self) -> str:
        text = self._overlap.flush() if self._overlap is not None else ""
        out = self._reconcile(text)
        # Still held means still a prefix of what the client already has.
        self._held = ""
        return out

    def _reconcile(self, text: str) -> str:
        if not self._dangling:
            return text
        self._held += text
        # The client already has `dangling` (past the safe prefix): skip it where the
        # continuation re-emits it, and stop skipping at the first difference.
        common = 0
        limit = min(len(self._held), len(self._dangling))
        while common < limit and self._held[common] == self._dangling[common]:
            common += 1
        if common == len(self._dangling):
            out, self._held, self._dangling = self._held[common:], "", ""
            return out
        if common < limit:
            out, self._held, self._dangling = self._held[common:], "", ""
            return out
        return ""
