"""An in-memory world for the race core: a fake clock, scripted hosts and the core's commands
carried out in memory (tasks sent, cancels, client events, settlements). A whole race runs in
well under a millisecond of real time, whatever its deadlines."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llooma.duel import DuelOffer
from llooma.v1.common_pb2 import ErrorDetail, GenerationParams, Usage
from llooma.v1.host_pb2 import HostAccepted, HostChunk, HostFinished, HostTask, HostToken
from llooma.v1.pipeline_pb2 import (
    ChatRequest,
    ClientEvent,
    HostCandidate,
    TaskAssignment,
)
from llooma.v1.race_pb2 import RaceEvent
from llooma.v1.settlement_pb2 import TaskSettlement
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
from services.racer.pace import Pace
from services.racer.report import race_event, settlements
from services.racer.state import Race

# One step of a host's script: after `delay` seconds (from the previous step), send `chunk`.
Step = tuple[float, HostChunk]
Script = Callable[[HostTask], list[Step]]


def tokens(
    *pieces: str,
    first: float = 0.05,
    gap: float = 0.01,
    finish: str | None = "stop",
    usage: Usage | None = None,
    accept: bool = False,
    reasoning: Iterable[str] = (),
) -> Script:
    """A host that answers: (accepted,) reasoning and text tokens, then finished (or nothing:
    finish=None is a stall after the last token)."""

    def script(task: HostTask) -> list[Step]:
        steps: list[Step] = []
        if accept:
            steps.append((0.0, HostChunk(accepted=HostAccepted())))
        delay = first
        for thought in reasoning:
            steps.append((delay, HostChunk(token=HostToken(reasoning=thought))))
            delay = gap
        for piece in pieces:
            steps.append((delay, HostChunk(token=HostToken(text=piece))))
            delay = gap
        if finish is not None:
            done = HostFinished(finish_reason=finish, usage=usage or Usage())
            steps.append((delay, HostChunk(finished=done)))
        return steps

    return script


def fails(code: int, after: float = 0.01, **detail: object) -> Script:
    def script(task: HostTask) -> list[Step]:
        return [(after, HostChunk(failed=ErrorDetail(code=code, message="no", **detail)))]  # type: ignore[arg-type]

    return script


def silent(task: HostTask) -> list[Step]:
    return []


def then(first: Script, second: Script) -> Script:
    """`first` on the first task this host gets, `second` on later ones."""
    calls = itertools.count()

    def script(task: HostTask) -> list[Step]:
        return first(task) if next(calls) == 0 else second(task)

    return script


class Reply:
    """What the racer's wildcard subscription hands it: only subject and data are read."""

    def __init__(self, subject: str, data: bytes) -> None:
        self.subject = subject
        self.data = data


def assignment(
    hosts: Iterable[str],
    fallback: Iterable[str] = (),
    *,
    deadline_ms: int = 1000,
    stall_ms: int = 500,
    hedge_ms: int = 0,
    max_tokens: int | None = None,
    content: str = "Tell me a story.",
    prefill: Iterable[str] = (),
) -> TaskAssignment:
    params = GenerationParams() if max_tokens is None else GenerationParams(max_tokens=max_tokens)
    request = ChatRequest(
        request_id="r1",
        model="m",
        reply_subject="reply",
        api_key_id="k",
        params=params,
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
    )
    return TaskAssignment(
        request=request,
        task_id="t1",
        hosts=[HostCandidate(host_id=h, model="m", assistant_prefill=h in prefill) for h in hosts],
        fallback=[
            HostCandidate(host_id=h, model="m", assistant_prefill=h in prefill) for h in fallback
        ],
        first_token_deadline_ms=deadline_ms,
        stall_deadline_ms=stall_ms,
        hedge_delay_ms=hedge_ms,
    )


@dataclass
class Sim:
    task: TaskAssignment
    hosts: dict[str, Script]
    fallback_timeout_s: float = 1.0
    max_continuations: int = 2
    duels: Callable[[DuelOffer], str | None] | None = None
    pace: Pace | None = None
    # Whether each loser left at the first token is kept as a silence probe.
    probe: Callable[[], bool] | None = None
    now: float = 0.0
    events: list[ClientEvent] = field(default_factory=list)
    launched: list[tuple[float, str, HostTask]] = field(default_factory=list)
    cancelled: list[tuple[float, str]] = field(default_factory=list)
    dueling: list[str] = field(default_factory=list)
    duel_chunks: list[HostChunk] = field(default_factory=list)
    closed_duels: list[tuple[str, str | None]] = field(default_factory=list)
    race: Race | None = None
    settled: dict[str, TaskSettlement] = field(default_factory=dict)
    event: RaceEvent | None = None
    deltas: int = 0

    def __post_init__(self) -> None:
        ids = (f"a{n}" for n in itertools.count())
        sampler = _Sampler(self.duels) if self.duels is not None else None
        self.core = RaceCore(
            self.task,
            0.0,
            fallback_timeout_s=self.fallback_timeout_s,
            max_continuations=self.max_continuations,
            duels=sampler,
            deadlines=self.pace,
            new_id=lambda: next(ids),
            probe=self.probe,
        )
        self._pending: list[tuple[float, int, str, HostChunk]] = []
        self._seq = itertools.count()
        self._host_of: dict[str, str] = {}

    def run(
        self,
        cancel_at: float | None = None,
        limit_s: float = 600.0,
        *,
        resume: tuple[str, int] | None = None,
    ) -> Sim:
        """`resume`: take the race over from a racer that stopped, the client having
        received that text in that many token chunks."""
        core = self.core
        self._do(core.start(self.now) if resume is None else core.resume(self.now, *resume))
        while not core.done:
            chunk_at = self._pending[0][0] if self._pending else float("inf")
            wakeup = core.wakeup_at if core.wakeup_at is not None else float("inf")
            cancel = cancel_at if cancel_at is not None else float("inf")
            at = min(chunk_at, wakeup, cancel)
            assert at <= limit_s, "the race never ends"
            self.now = max(self.now, at)
            if cancel <= at:
                self._do(core.on_cancel(self.now))
                break
            if chunk_at <= at:
                # Everything that arrived at once is one batch, as the racer drains its inbox.
                commands: list[Command] = []
                while self._pending and self._pending[0][0] <= self.now and not core.done:
                    _, _, attempt_id, chunk = heapq.heappop(self._pending)
                    dueling = core.race.dueling
                    if dueling is not None and dueling.attempt_id == attempt_id:
                        # The duel's, as the racer routes it; the core still watches it.
                        self.duel_chunks.append(chunk)
                    commands += core.on_chunk(attempt_id, chunk, self.now)
                commands += core.flush()
                self._do(commands)
            else:
                self._do(core.on_timer(self.now))
        return self

    def _do(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, Launch):
                host_id = command.attempt.host.host_id
                self.launched.append((self.now, host_id, command.task))
                self._host_of[command.attempt.attempt_id] = host_id
                if self.pace is not None:
                    self.pace.launched(command.attempt)
                at = self.now
                for delay, chunk in self.hosts[host_id](command.task):
                    at += delay
                    entry = (at, next(self._seq), command.attempt.attempt_id, chunk)
                    heapq.heappush(self._pending, entry)
            elif isinstance(command, Cancel):
                attempt_id = command.attempt.attempt_id
                self.cancelled.append((self.now, self._host_of[attempt_id]))
                # A cancelled host stops: its chunks still to come never arrive.
                self._pending = [p for p in self._pending if p[2] != attempt_id]
                heapq.heapify(self._pending)
            elif isinstance(command, Emit):
                self.events.append(command.event)
                self.deltas += command.event.HasField("delta")
            elif isinstance(command, HandToDuel):
                self.dueling.append(command.attempt.attempt_id)
            elif isinstance(command, CloseDuel):
                self.closed_duels.append((command.loser.host.host_id, command.winner_text))
            elif isinstance(command, Settle):
                self.race = command.race
                if self.pace is not None:
                    self.pace.settled(command.race)
                for s in settlements(command.race, self.now, 0):
                    self.settled[s.host_id] = s
                self.event = race_event(command.race, self.now, 0)

    # -- what the client saw ---------------------------------------------------------------

    @property
    def text(self) -> str:
        return "".join(e.delta.text for e in self.events if e.HasField("delta"))

    @property
    def reasoning(self) -> str:
        return "".join(e.delta.reasoning for e in self.events if e.HasField("delta"))

    @property
    def last(self) -> ClientEvent:
        return self.events[-1]

    def launches(self, host_id: str) -> list[tuple[float, HostTask]]:
        return [(at, task) for at, host, task in self.launched if host == host_id]

    def was_cancelled(self, host_id: str) -> bool:
        return any(host == host_id for _, host in self.cancelled)


class _Sampler:
    def __init__(self, pick: Callable[[DuelOffer], str | None]) -> None:
        self._pick = pick

    def open(self, offer: DuelOffer) -> str | None:
        return self._pick(offer)
