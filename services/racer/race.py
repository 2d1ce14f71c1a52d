"""The racer's NATS side: routes host chunks, timers and client cancels into each race's core
(core.py) and carries out its commands over a small I/O protocol (`RaceIO`); settles a
finished race with report.py's settlements and race event, retried while NATS is away; keeps
each single-choice race's record (records.py) and resumes a dead racer's races.

Over 400 lines for a reason: one race's wire side (`_Run`: inbox, spans, commands, record,
settlement) shares the racer's routing tables; the takeover's claim and the record's writes
live in records.py, its pure parts in takeover.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue
from opentelemetry.trace import Span, SpanKind

from llooma import bus, subjects, tracing
from llooma.race_records import RecordWriter, race_key, races_bucket
from llooma.service import Service
from llooma.v1.common_pb2 import ERROR_CODE_HOST_FAILED, ErrorCode, ErrorDetail
from llooma.v1.host_pb2 import CancelTask, HostChunk, HostTask
from llooma.v1.pipeline_pb2 import ClientEvent, RaceResume, TaskAssignment
from llooma.v1.race_pb2 import AttemptRole
from services.racer.commands import (
    Cancel,
    CloseDuel,
    Command,
    Emit,
    HandToDuel,
    Launch,
    Settle,
)
from services.racer.core import RaceCore
from services.racer.duel import Duels
from services.racer.pace import Pace
from services.racer.records import take_over
from services.racer.report import (
    ATTEMPT_OUTCOME_NAMES,
    attempt_usage,
    outcome,
    paid_winner,
    race_event,
    settlements,
    succeeded,
)
from services.racer.state import Attempt, Race
from services.racer.takeover import race_record, record_state, recorded

log = logging.getLogger(__name__)

# How long a settlement or race event publish is retried while NATS is away.
PUBLISH_RETRY_S = 60.0

Inbox = asyncio.Queue[tuple[str, HostChunk]]
# Takes a race's assignment off its queue (Service.claim).
Claim = Callable[[], None]


def _no_claim() -> None:
    """A race run without a queue (tests, a resumed race's own claim)."""


class RaceIO(Protocol):
    """What a race does to the world; NATS here, memory in tests."""

    async def launch(self, host_id: str, task: HostTask, headers: dict[str, str] | None) -> None:
        """Send a host its task; its chunks come back on the racer's reply subject."""

    async def cancel(self, host_id: str, attempt_id: str) -> None: ...

    async def emit(self, reply: str, event: ClientEvent) -> None: ...

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        """Hand a settlement or race event to JetStream (idempotent by msg_id)."""


class NatsIO:
    def __init__(self, nc: Client, js: JetStreamContext, instance_id: str) -> None:
        self.nc = nc
        self.js = js
        self._instance_id = instance_id

    async def launch(self, host_id: str, task: HostTask, headers: dict[str, str] | None) -> None:
        await self.nc.publish(
            subjects.host_task(task.model, host_id),
            task.SerializeToString(),
            reply=subjects.host_reply(self._instance_id, task.attempt_id),
            headers=headers,
        )

    async def cancel(self, host_id: str, attempt_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(
                subjects.host_cancel(host_id), CancelTask(attempt_id=attempt_id).SerializeToString()
            )

    async def emit(self, reply: str, event: ClientEvent) -> None:
        await self.nc.publish(reply, event.SerializeToString())

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        # A settlement must outlive a NATS restart: retry (idempotent by id) until it is back.
        give_up_at = time.monotonic() + PUBLISH_RETRY_S
        delay_s = 0.1
        while True:
            try:
                await bus.hand_off(self.js, subject, payload, msg_id)
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


class Racer:
    """Runs races; one wildcard subscription routes every host chunk to its race."""

    def __init__(
        self,
        instance_id: str,
        *,
        max_continuations: int = 2,
        fallback_first_token_ms: int = 10_000,
        duels: Duels | None = None,
        io: RaceIO | None = None,
        silence_probe_fraction: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self._instance_id = instance_id
        rng = rng or random.Random()
        # Each loser a race's first token leaves is kept as a silence probe with this chance.
        self.probe = (
            (lambda: rng.random() < silence_probe_fraction) if silence_probe_fraction > 0 else None
        )
        self._duels = duels
        self._max_continuations = max_continuations
        self._fallback_timeout_s = fallback_first_token_ms / 1000.0
        self._io = io
        self._inboxes: dict[str, Inbox] = {}
        # Each host's observed pace, shared by every race: the deadlines follow it.
        self.pace = Pace()
        # A split request runs one race per node, all under the request's id.
        self._by_request: dict[str, set[asyncio.Task[None]]] = {}
        # Where single-choice races are recorded for a takeover (None: not recorded).
        self._races: KeyValue | None = None

    async def start(self, service: Service) -> None:
        if self._io is None:
            self._io = NatsIO(service.nc, service.js, self._instance_id)
        self._races = await races_bucket(service.js)
        prefix = subjects.host_reply_prefix(self._instance_id)
        await service.subscribe(f"{prefix}.*", self._on_host_chunk)
        await service.subscribe(subjects.REQUEST_CANCEL_ANY, self._on_request_cancel)

    async def _on_host_chunk(self, msg: Msg) -> None:
        attempt_id = subjects.host_reply_attempt_id(msg.subject)
        inbox = self._inboxes.get(attempt_id)
        if inbox is None:
            # A duel's (its loser's or a judge's), or late tokens of an attempt already settled.
            if self._duels is not None:
                await self._duels.on_chunk(msg)
            return
        try:
            chunk = HostChunk.FromString(msg.data)
        except Exception:
            chunk = HostChunk(failed=ErrorDetail(code=ERROR_CODE_HOST_FAILED, message="garbled"))
        inbox.put_nowait((attempt_id, chunk))

    async def _on_request_cancel(self, msg: Msg) -> None:
        for task in self._by_request.get(subjects.request_cancel_request_id(msg.subject), set()):
            task.cancel()

    async def run_choices(self, assignment: TaskAssignment, claim: Claim = _no_claim) -> None:
        """Every choice the request asks for (`n`), each its own race. `claim` takes the
        assignment off the queue: once the race is recorded (`_Run.drive`), at once when it
        is not (several choices are never resumed)."""
        count = assignment.request.choices
        if count <= 1:
            await self.run(assignment, claim=claim)
            return
        claim()
        await asyncio.gather(*(self.run(choice_assignment(assignment, i)) for i in range(count)))

    async def resume(self, resume: RaceResume, claim: Claim = _no_claim) -> None:
        """Finish the answer of a racer that stopped (the ingress asks), if its record can be
        claimed: settle the dead race's attempts, then race on from what the client received.
        `claim` takes the request off the queue once the record is claimed or cannot be."""
        assert self._io is not None
        assert self._races is not None
        try:
            taken = await take_over(self._races, self._io, self._instance_id, resume)
        except Exception as error:
            taken = f"its race could not be claimed ({error!r})"
        claim()
        if isinstance(taken, str):
            log.warning("request %s not resumed: %s", resume.request_id, taken)
            detail = ErrorDetail(code=ERROR_CODE_HOST_FAILED, message=taken)
            await self._io.emit(resume.reply_subject, ClientEvent(failed=detail))
            return
        assignment, writer = taken
        await self.run(assignment, writer, resume)

    async def run(
        self,
        assignment: TaskAssignment,
        writer: RecordWriter | None = None,
        resume: RaceResume | None = None,
        claim: Claim = _no_claim,
    ) -> None:
        request_id = assignment.request.request_id
        task = asyncio.current_task()
        assert task is not None
        self._by_request.setdefault(request_id, set()).add(task)
        if writer is None and self._races is not None and recorded(assignment):
            writer = RecordWriter(self._races, race_key(request_id, assignment.request.node_id))
        run = _Run(self, assignment, writer, resume, claim)
        try:
            await run.drive()
        except asyncio.CancelledError:
            log.debug("request %s cancelled by its client", request_id)
        finally:
            running = self._by_request.get(request_id, set())
            running.discard(task)
            if not running:
                self._by_request.pop(request_id, None)
            await run.stop()


class _Run:
    """One race on the wire: its inbox, spans and the core's commands carried out."""

    def __init__(
        self,
        racer: Racer,
        assignment: TaskAssignment,
        writer: RecordWriter | None,
        resume: RaceResume | None,
        claim: Claim = _no_claim,
    ) -> None:
        assert racer._io is not None
        self._racer = racer
        self._io = racer._io
        self._writer = writer
        self._resume = resume
        self._claim = claim
        # The race's record was created by the assignment's other delivery: left to it.
        self._abandoned = False
        self._recorded: tuple[int, str] = (0, "")
        self._inbox: Inbox = asyncio.Queue()
        # Commands the core gave that have not been carried out yet (see `stop`).
        self._pending: deque[Command] = deque()
        self._spans: dict[str, Span] = {}
        self._span: Span | None = None
        self._choice = assignment.choice_index
        if tracing.enabled():
            self._span = tracing.start_span(
                f"race {assignment.request.model}",
                attributes={
                    **tracing.chat_attributes(assignment.request.model),
                    "llooma.request_id": assignment.request.request_id,
                    "llooma.task_id": assignment.task_id,
                },
            )
        self.core = RaceCore(
            assignment,
            time.monotonic(),
            fallback_timeout_s=racer._fallback_timeout_s,
            max_continuations=racer._max_continuations,
            duels=racer._duels,
            deadlines=racer.pace,
            racer_id=racer._instance_id,
            probe=racer.probe,
        )

    async def drive(self) -> None:
        core = self.core
        resume = self._resume
        if resume is None:
            commands = core.start(time.monotonic())
            if not await self._recorded_first():
                return
            await self._execute(commands)
        else:
            await self._execute(
                core.resume(time.monotonic(), resume.emitted, resume.delivered_tokens)
            )
        while not core.done:
            wakeup = core.wakeup_at
            try:
                async with asyncio.timeout_at(_loop_time(wakeup) if wakeup is not None else None):
                    item = await self._inbox.get()
            except TimeoutError:
                await self._execute(core.on_timer(time.monotonic()))
                continue
            # Whatever has already arrived goes out as one delta: no waiting between tokens.
            commands = self._feed(*item)
            while not self._inbox.empty() and not core.done:
                commands += self._feed(*self._inbox.get_nowait())
            commands += core.flush()
            await self._execute(commands)

    def _feed(self, attempt_id: str, chunk: HostChunk) -> list[Command]:
        dueling = self.core.race.dueling
        if dueling is not None and dueling.attempt_id == attempt_id:
            # Taken for a duel, perhaps earlier in this very batch: its chunks are the duel's,
            # and the core still watches for its first token (a silent loser is a no-show).
            assert self._racer._duels is not None
            self._racer._duels.feed(attempt_id, chunk)
        return self.core.on_chunk(attempt_id, chunk, time.monotonic())

    async def _recorded_first(self) -> bool:
        """Record the race before any host hears of it, then claim its assignment: a racer
        that dies before the record lands has the assignment redelivered to a replica, which
        races afresh; one that dies after has every launched attempt on record, to be resumed
        and settled by another racer (docs/ARCHITECTURE.md, "A racer's death"). False: the
        create was refused, so this assignment was delivered twice and the other delivery's
        race holds the record (running, resumed or finished), and this one launched nothing
        (`_abandoned`). Awaiting the create costs one round trip to nats-server on the way to
        the first token; launching meanwhile would let two deliveries both reach hosts and
        the client."""
        writer = self._writer
        if writer is not None:
            self._record()
            await writer.written()
            if writer.taken_over:
                log.warning(
                    "race %s is recorded by another racer", self.core.race.assignment.task_id
                )
                self._abandoned = True
                return False
        self._claim()
        return True

    async def stop(self) -> None:
        """However the race ended (finished, failed, cancelled by its client): settle it. The
        client's cancel can land while the race's last commands go out (the ingress cancels a
        failed request as soon as it reads the failure): what it interrupted is carried out
        here, its `Settle` included; the core, already done, would not give it again."""
        if self._abandoned:
            tracing.end_span(self._span)
            return
        if not self.core.done:
            self._pending.extend(self.core.on_cancel(time.monotonic()))
        await self._execute([])
        # A duel's loser outlives its race: what of its stream is still queued here is the
        # duel's (no await from here on, so no chunk lands in between).
        dueling, duels = self.core.race.dueling, self._racer._duels
        while not self._inbox.empty():
            attempt_id, chunk = self._inbox.get_nowait()
            if dueling is not None and duels is not None and attempt_id == dueling.attempt_id:
                duels.feed(attempt_id, chunk)
        for attempt_id in self.core.race.attempts:
            self._racer._inboxes.pop(attempt_id, None)

    def _record(self) -> None:
        """Rewrite the race's record when its attempts or its winner changed (not per token)."""
        race = self.core.race
        if self._writer is None or self.core.done or record_state(race) == self._recorded:
            return
        self._recorded = record_state(race)
        self._writer.write(race_record(race, self._racer._instance_id))

    async def _execute(self, commands: list[Command]) -> None:
        io = self._io
        race = self.core.race
        self._record()
        pending = self._pending
        pending.extend(commands)
        while pending:
            # Taken off before it runs: a command a cancel interrupts is not run twice.
            command = pending.popleft()
            if isinstance(command, Emit):
                if self._span is not None and command.event.HasField("finished"):
                    finished = command.event.finished
                    tracing.record_usage(
                        self._span,
                        finished.usage.input_tokens,
                        finished.usage.output_tokens,
                        finished.finish_reason,
                    )
                if self._choice:
                    command.event.choice_index = self._choice
                await io.emit(race.reply, command.event)
            elif isinstance(command, Launch):
                attempt = command.attempt
                self._racer._inboxes[attempt.attempt_id] = self._inbox
                self._racer.pace.launched(attempt)
                span = self._start_span(attempt)
                await io.launch(attempt.host.host_id, command.task, tracing.headers_for(span))
            elif isinstance(command, Cancel):
                await io.cancel(command.attempt.host.host_id, command.attempt.attempt_id)
            elif isinstance(command, HandToDuel):
                # Its chunks still come to this race (passed on to the duel) while the race
                # lives, then reach the duel through the racer's wildcard subscription.
                pass
            elif isinstance(command, CloseDuel):
                assert self._racer._duels is not None
                kept = self._racer._duels.close(command.loser.attempt_id, command.winner_text)
                if not kept and race.dueling is not None:
                    race.dueling = None
                    command.loser.cancelled = True
                    await io.cancel(command.loser.host.host_id, command.loser.attempt_id)
            elif isinstance(command, Settle):
                self._racer.pace.settled(command.race)
                # A client's cancel landing now (the ingress sends one after a failure) must
                # not cut the settlements short.
                await asyncio.shield(self._settle(command.race))

    def _start_span(self, attempt: Attempt) -> Span | None:
        if not tracing.enabled():
            return None
        span = tracing.start_span(
            f"chat {attempt.host.model}",
            kind=SpanKind.CLIENT,
            parent=self._span,
            attributes={
                **tracing.chat_attributes(attempt.host.model),
                "llooma.attempt_id": attempt.attempt_id,
                "llooma.host_id": attempt.host.host_id,
                "llooma.attempt_role": AttemptRole.Name(attempt.role),
            },
        )
        if span is not None:
            self._spans[attempt.attempt_id] = span
        return span

    async def _settle(self, race: Race) -> None:
        """Settle every attempt and publish the race event (both idempotent by id), unless
        another racer took the race over (this one was thought dead): then that one does."""
        if self._writer is not None and not await self._writer.release():
            log.warning("race %s was taken over by another racer", race.assignment.task_id)
            return
        now, unix_nanos = time.monotonic(), time.time_ns()
        paid, _ = paid_winner(race)
        # Concurrently: one attempt's retries while NATS is away do not hold up the others.
        await asyncio.gather(
            *(
                self._settle_one(race, race.attempts[s.attempt_id], s.SerializeToString(), paid)
                for s in settlements(race, now, unix_nanos)
            )
        )
        event = race_event(race, now, unix_nanos)
        with tracing.within(self._span):
            await self._io.publish(
                subjects.RACE_EVENT, event.SerializeToString(), race.assignment.task_id
            )
        span = self._span
        if span is not None:
            span.set_attributes(
                {
                    "llooma.winner_host_id": event.winner_host_id,
                    "llooma.continuations": race.continuations,
                    "llooma.first_token_deadline_hit": race.deadline_hit,
                }
            )
            if race.winner is not None:
                span.set_attribute("gen_ai.response.model", race.winner.host.model)
        ok = succeeded(race)
        tracing.end_span(span, error="" if ok else ErrorCode.Name(race.error))

    async def _settle_one(
        self, race: Race, attempt: Attempt, payload: bytes, paid: Attempt | None
    ) -> None:
        span: Span | None = self._spans.get(attempt.attempt_id)
        # The settlement carries its attempt's traceparent: the ledger's span joins the trace.
        with tracing.within(span):
            await self._io.publish(subjects.SETTLEMENT_TASK, payload, attempt.attempt_id)
        if span is None:
            return
        what = outcome(attempt, paid)
        span.set_attributes(
            {
                "llooma.outcome": ATTEMPT_OUTCOME_NAMES.get(what, "failed"),
                "llooma.first_token_ms": (
                    int((attempt.first_token_at - attempt.launched_at) * 1000)
                    if attempt.first_token_at
                    else 0
                ),
                "llooma.stalled": attempt.stalled,
            }
        )
        usage = attempt_usage(race, attempt)
        if attempt is paid or attempt.usage is not None:
            tracing.record_usage(span, usage.input_tokens, usage.output_tokens)
        else:
            span.set_attribute("gen_ai.usage.output_tokens", attempt.output_tokens)
        tracing.end_span(span, error="attempt_failed" if attempt.failed else "")


def choice_assignment(assignment: TaskAssignment, index: int) -> TaskAssignment:
    """The race for one of a request's choices: its own task id (so its own settlements and
    race event), the same hosts."""
    choice = TaskAssignment()
    choice.CopyFrom(assignment)
    choice.task_id = f"{assignment.task_id}-{index}"
    choice.choice_index = index
    return choice


def _loop_time(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
