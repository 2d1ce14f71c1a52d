"""One task's race: the first host to deliver a token wins, the rest are told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.service import Service
from llooma.v1.common_pb2 import (
    ERROR_CODE_DEADLINE_EXCEEDED,
    ERROR_CODE_HOST_BUSY,
    ERROR_CODE_HOST_FAILED,
    ErrorCode,
    ErrorDetail,
    Usage,
)
from llooma.v1.host_pb2 import CancelTask, HostChunk, HostTask
from llooma.v1.pipeline_pb2 import (
    ClientDelta,
    ClientEvent,
    ClientFinished,
    ClientStarted,
    TaskAssignment,
)
from llooma.v1.settlement_pb2 import (
    ATTEMPT_OUTCOME_FAILED,
    ATTEMPT_OUTCOME_LOST,
    ATTEMPT_OUTCOME_WON,
    TaskSettlement,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Attempt:
    attempt_id: str
    host_id: str
    model: str
    started: float
    first_token_at: float | None = None
    output_tokens: int = 0
    usage: Usage | None = None
    failed: bool = False


class RaceFailed(Exception):
    def __init__(self, code: ErrorCode.ValueType, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Race:
    assignment: TaskAssignment
    attempts: dict[str, Attempt] = field(default_factory=dict)
    inbox: asyncio.Queue[tuple[Attempt, HostChunk]] = field(default_factory=asyncio.Queue)


class Racer:
    """Runs races; one wildcard subscription routes every host chunk to its race."""

    _nc: Client
    _js: JetStreamContext

    def __init__(self, instance_id: str) -> None:
        self._instance_id = instance_id
        self._by_attempt: dict[str, tuple[Race, Attempt]] = {}
        self._by_request: dict[str, asyncio.Task[None]] = {}

    async def start(self, service: Service) -> None:
        self._nc = service.nc
        self._js = service.js
        prefix = subjects.host_reply_prefix(self._instance_id)
        await service.subscribe(f"{prefix}.*", self._on_host_chunk)
        await service.subscribe(subjects.REQUEST_CANCEL_ANY, self._on_request_cancel)

    async def _on_host_chunk(self, msg: Msg) -> None:
        routed = self._by_attempt.get(msg.subject.rpartition(".")[2])
        if routed is None:
            return  # a chunk from an attempt already settled: late loser tokens
        race, attempt = routed
        try:
            chunk = HostChunk.FromString(msg.data)
        except Exception:
            chunk = HostChunk(failed=ErrorDetail(code=ERROR_CODE_HOST_FAILED, message="garbled"))
        race.inbox.put_nowait((attempt, chunk))

    async def _on_request_cancel(self, msg: Msg) -> None:
        request_id = msg.subject.split(".")[-2]
        task = self._by_request.get(request_id)
        if task is not None:
            task.cancel()

    async def run(self, assignment: TaskAssignment) -> None:
        request_id = assignment.request.request_id
        task = asyncio.current_task()
        assert task is not None
        self._by_request[request_id] = task
        race = Race(assignment)
        try:
            await self._race(race)
        except asyncio.CancelledError:
            log.debug("request %s cancelled by its client", request_id)
        finally:
            self._by_request.pop(request_id, None)
            await self._cancel_hosts(race, keep=None)
            for attempt_id in race.attempts:
                self._by_attempt.pop(attempt_id, None)
            await self._settle(race)

    async def _launch(self, race: Race) -> None:
        request = race.assignment.request
        for host in race.assignment.hosts:
            attempt = Attempt(uuid.uuid4().hex, host.host_id, host.model, time.monotonic())
            race.attempts[attempt.attempt_id] = attempt
            self._by_attempt[attempt.attempt_id] = (race, attempt)
            task = HostTask(
                attempt_id=attempt.attempt_id,
                model=host.model,
                messages=request.messages,
                params=request.params,
            )
            await self._nc.publish(
                subjects.host_task(host.model, host.host_id),
                task.SerializeToString(),
                reply=subjects.host_reply(self._instance_id, attempt.attempt_id),
            )

    async def _race(self, race: Race) -> None:
        reply = race.assignment.request.reply_subject
        try:
            await self._launch(race)
            winner, first = await self._first_token(race)
            await self._cancel_hosts(race, keep=winner)
            await self._emit(
                reply,
                ClientEvent(
                    started=ClientStarted(path=race.assignment.request.path, model=winner.model)
                ),
            )
            await self._stream(race, winner, first)
        except RaceFailed as failure:
            await self._emit(
                reply, ClientEvent(failed=ErrorDetail(code=failure.code, message=str(failure)))
            )

    async def _first_token(self, race: Race) -> tuple[Attempt, HostChunk]:
        deadline_s = race.assignment.first_token_deadline_ms / 1000.0
        alive = set(race.attempts)
        busy = 0
        try:
            async with asyncio.timeout(deadline_s):
                while True:
                    attempt, chunk = await race.inbox.get()
                    kind = chunk.WhichOneof("event")
                    if kind == "token":
                        attempt.first_token_at = time.monotonic()
                        attempt.output_tokens += 1
                        return attempt, chunk
                    if kind == "finished":
                        attempt.first_token_at = time.monotonic()
                        return attempt, chunk
                    if kind == "failed":
                        attempt.failed = True
                        alive.discard(attempt.attempt_id)
                        busy += chunk.failed.code == ERROR_CODE_HOST_BUSY
                        if not alive:
                            code = ERROR_CODE_HOST_BUSY if busy else ERROR_CODE_HOST_FAILED
                            raise RaceFailed(
                                code, f"every raced host failed: {chunk.failed.message}"
                            )
        except TimeoutError:
            raise RaceFailed(
                ERROR_CODE_DEADLINE_EXCEEDED,
                f"no host produced a first token within {deadline_s:.3f} s",
            ) from None

    async def _stream(self, race: Race, winner: Attempt, first: HostChunk) -> None:
        """Relay the winner's chunks; tokens already queued go out as one delta (no waiting)."""
        reply = race.assignment.request.reply_subject
        stall_s = race.assignment.stall_deadline_ms / 1000.0
        chunk: HostChunk | None = first
        text: list[str] = []
        while True:
            if chunk is None:
                if text:
                    await self._emit(reply, ClientEvent(delta=ClientDelta(text="".join(text))))
                    text.clear()
                chunk = await self._next_from(race, winner, stall_s)
            kind = chunk.WhichOneof("event")
            if kind == "token":
                text.append(chunk.token.text)
            elif kind in ("finished", "failed"):
                if text:
                    await self._emit(reply, ClientEvent(delta=ClientDelta(text="".join(text))))
                if kind == "failed":
                    winner.failed = True
                    raise RaceFailed(ERROR_CODE_HOST_FAILED, f"host failed: {chunk.failed.message}")
                winner.usage = chunk.finished.usage
                finished = ClientFinished(
                    finish_reason=chunk.finished.finish_reason, usage=chunk.finished.usage
                )
                await self._emit(reply, ClientEvent(finished=finished))
                return
            chunk = self._queued_from(race, winner)

    def _queued_from(self, race: Race, winner: Attempt) -> HostChunk | None:
        """The winner's next chunk if one is already queued, else None."""
        while not race.inbox.empty():
            chunk = self._count(winner, *race.inbox.get_nowait())
            if chunk is not None:
                return chunk
        return None

    @staticmethod
    def _count(winner: Attempt, attempt: Attempt, chunk: HostChunk) -> HostChunk | None:
        """Count a token to its attempt; return the chunk if it is the winner's."""
        if chunk.HasField("token"):
            attempt.output_tokens += 1
        return chunk if attempt is winner else None

    async def _next_from(self, race: Race, winner: Attempt, stall_s: float) -> HostChunk:
        try:
            async with asyncio.timeout(stall_s):
                while True:
                    chunk = self._count(winner, *await race.inbox.get())
                    if chunk is not None:
                        return chunk
        except TimeoutError:
            winner.failed = True
            raise RaceFailed(
                ERROR_CODE_DEADLINE_EXCEEDED, f"host stalled for more than {stall_s:.3f} s"
            ) from None

    async def _emit(self, subject: str, event: ClientEvent) -> None:
        await self._nc.publish(subject, event.SerializeToString())

    async def _cancel_hosts(self, race: Race, keep: Attempt | None) -> None:
        for attempt in race.attempts.values():
            if attempt is keep or attempt.usage is not None:
                continue
            with contextlib.suppress(Exception):
                await self._nc.publish(
                    subjects.host_cancel(attempt.host_id),
                    CancelTask(attempt_id=attempt.attempt_id).SerializeToString(),
                )

    async def _settle(self, race: Race) -> None:
        request = race.assignment.request
        now = time.monotonic()
        for attempt in race.attempts.values():
            if attempt.usage is not None and not attempt.failed:
                outcome = ATTEMPT_OUTCOME_WON
            elif attempt.failed:
                outcome = ATTEMPT_OUTCOME_FAILED
            else:
                outcome = ATTEMPT_OUTCOME_LOST
            first_ms = (
                (attempt.first_token_at - attempt.started) * 1000 if attempt.first_token_at else 0
            )
            settlement = TaskSettlement(
                attempt_id=attempt.attempt_id,
                request_id=request.request_id,
                task_id=race.assignment.task_id,
                host_id=attempt.host_id,
                model=attempt.model,
                outcome=outcome,
                usage=attempt.usage or Usage(output_tokens=attempt.output_tokens),
                first_token_ms=int(first_ms),
                duration_ms=int((now - attempt.started) * 1000),
                finished_unix_nanos=time.time_ns(),
                api_key_id=request.api_key_id,
            )
            try:
                await bus.hand_off(
                    self._js,
                    subjects.SETTLEMENT_TASK,
                    settlement.SerializeToString(),
                    attempt.attempt_id,
                )
            except Exception:
                log.exception("settlement of %s not published", attempt.attempt_id)
