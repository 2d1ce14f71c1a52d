"""One task's race as a state machine with no transport and no clock (paper II-B, II-D, III):
the first host to deliver a token wins and the rest are told to stop; no token by the deadline
δ sends the task to the fallback pool; a stream that stalls or fails continues on another host
from the text already emitted.

Events in (`start`, `on_chunk`, `on_timer`, `on_cancel`, `flush`), each with the time it
happens; commands out (`Launch`, `Cancel`, `Emit`, `HandToDuel`, `CloseDuel`, `Settle`), which
the racer (race.py) carries out over NATS and a test carries out in memory. `wakeup_at` is when
the core next wants `on_timer`. After `Settle` the race is over and report.py turns its state
into settlements and a race event.

Over 400 lines for a reason: this is one state machine whose phases (first token, streaming,
continuing) share its state and hand over to each other; split by phase, one transition would
be read across files. Its data (state.py), commands (commands.py), text (stream.py), handover
prompt (handover.py) and settlement (report.py) live apart."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Literal, TypeAlias

from llooma.v1.common_pb2 import (
    ERROR_CODE_DEADLINE_EXCEEDED,
    ERROR_CODE_HOST_BUSY,
    ERROR_CODE_HOST_FAILED,
    ERROR_CODE_REQUEST_REJECTED,
    REQUEST_PATH_FALLBACK,
    TASK_KIND_EMBEDDING,
    TASK_KIND_TEXT_COMPLETION,
    ChatMessage,
    Usage,
)
from llooma.v1.host_pb2 import HostChunk
from llooma.v1.pipeline_pb2 import (
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
    AttemptRole,
)
from services.racer.chunks import one_by_one
from services.racer.commands import (
    Cancel,
    CloseDuel,
    Command,
    DuelSampler,
    Emit,
    HandToDuel,
    Launch,
    Settle,
    duel_offer,
)
from services.racer.handover import host_task, plan_handover
from services.racer.pace import Deadlines, FixedDeadlines
from services.racer.report import billed_usage, overclaimed
from services.racer.state import Attempt, Race, RaceFailed, prompt_tokens, rejected
from services.racer.stream import AnswerStream, Seam

# "probing": the client's answer is over, but a loser kept to see whether it was silent
# (`_watch`) has neither sent its first token nor reached its deadline: settled after that.
Phase: TypeAlias = Literal["first_token", "streaming", "continuing", "probing", "done"]


class RaceCore:
    def __init__(
        self,
        assignment: TaskAssignment,
        now: float,
        *,
        fallback_timeout_s: float,
        max_continuations: int = 2,
        duels: DuelSampler | None = None,
        deadlines: Deadlines | None = None,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
        racer_id: str = "",
        probe: Callable[[], bool] | None = None,
    ) -> None:
        race = Race(assignment, now, fallback_timeout_s)
        self._racer_id = racer_id
        race.prompt_tokens = prompt_tokens(assignment.request.messages, assignment.request.params)
        # The fallback pool first; raced hosts that said no may still continue a stream.
        race.spare = [*assignment.fallback, *assignment.hosts]
        self.race = race
        self.phase: Phase = "first_token"
        self._duels = duels
        # Whether to keep one more loser running until its first token (a silence probe).
        self._probe = probe
        self._watched: list[Attempt] = []
        self._new_id = new_id
        self._max_continuations = max_continuations
        self._hedge_s = assignment.hedge_delay_ms / 1000.0
        self._max_tokens = assignment.request.params.max_tokens
        self._deadlines = deadlines or FixedDeadlines()
        self._deadline_s = self._deadlines.first_token_s(assignment)
        self._hedged: list[HostCandidate] = []
        self._busy = 0
        self._progress_at = 0.0
        self._answer = AnswerStream(race)
        self._heir: Attempt | None = None
        self._heir_deadline = 0.0
        self._why = ""
        self._seam = Seam()
        # Token chunks already told to the ingress (ClientDelta.tokens).
        self._relayed_tokens = 0
        self._out: list[Command] = []

    @property
    def done(self) -> bool:
        return self.phase == "done"

    @property
    def wakeup_at(self) -> float | None:
        phase_wakeup = self._phase_wakeup_at
        watched = [a.watched_until for a in self._watched if a.watched_until is not None]
        if not watched:
            return phase_wakeup
        first_watched = min(watched)
        return first_watched if phase_wakeup is None else min(phase_wakeup, first_watched)

    @property
    def _phase_wakeup_at(self) -> float | None:
        race = self.race
        if self.phase == "first_token":
            wakeups = [race.started + self._deadline_s + race.fallback_timeout_s]
            if self._hedged:
                wakeups.append(race.started + self._hedge_s)
            if not race.deadline_hit:
                wakeups.append(race.started + self._deadline_s)
            return min(wakeups)
        if self.phase == "streaming":
            # Asked again at every wait: another prompt prefilling on the host extends it.
            assert race.winner is not None
            return self._progress_at + self._deadlines.stall_s(race.winner, race.assignment)
        if self.phase == "continuing":
            return self._heir_deadline
        return None

    # -- events ----------------------------------------------------------------------------

    def start(self, now: float) -> list[Command]:
        """Launch the racers (hedged ones only later)."""
        hosts = list(self.race.assignment.hosts)
        self._launch(hosts[0], ATTEMPT_ROLE_RACER, now)
        if self._hedge_s > 0:
            self._hedged = hosts[1:]
        else:
            for host in hosts[1:]:
                self._launch(host, ATTEMPT_ROLE_RACER, now)
        return self._take()

    def resume(self, now: float, emitted: str, delivered_tokens: int) -> list[Command]:
        """Take over a race whose racer stopped: its client has `emitted` (its answer's first
        `delivered_tokens` token chunks); finish the answer on a spare host from there, as a
        handover does. Told to the ingress first (a `started` naming this racer); with nothing
        received yet, the race starts over."""
        race = self.race
        request = race.assignment.request
        started = ClientStarted(
            path=request.path, plan_decision=request.plan.decision, racer_instance_id=self._racer_id
        )
        self._out.append(Emit(ClientEvent(started=started)))
        if not emitted and not delivered_tokens:
            # Run afresh: the dead race delivered nothing, so this one is charged the prompt.
            return [*self._take(), *self.start(now)]
        # The dead race's winner was charged the prompt; this race's part is output only.
        race.resumed = True
        race.emitted.append(emitted)
        race.client_tokens = self._relayed_tokens = delivered_tokens
        race.client_chars = len(emitted)
        race.first_token_at = now
        self._why = "its racer stopped"
        try:
            self._next_heir(now)
        except RaceFailed as failure:
            self._fail(failure)
        return self._take()

    def on_chunk(self, attempt_id: str, chunk: HostChunk, now: float) -> list[Command]:
        attempt = self.race.attempts.get(attempt_id)
        if attempt is None:
            return []
        for one in one_by_one(chunk):
            if attempt.watched_until is not None and attempt is not self.race.dueling:
                self._watched_chunk(attempt, one, now)
                continue
            if attempt.watched_until is not None:
                self._watched_chunk(attempt, one, now)
            if attempt is self.race.dueling or self.phase in ("probing", "done"):
                break
            try:
                if self.phase == "first_token":
                    self._first_token_chunk(attempt, one, now)
                elif not self._count(attempt, one):
                    pass
                elif attempt is self._heir:
                    self._heir_chunk(attempt, one, now)
                elif attempt is self.race.winner and self.phase == "streaming":
                    self._winner_chunk(attempt, one, now)
            except RaceFailed as failure:
                self._fail(failure)
        return self._take()

    def on_timer(self, now: float) -> list[Command]:
        wakeup = self.wakeup_at
        if wakeup is None or now < wakeup:
            return []
        self._expire_watched(now)
        wakeup = self._phase_wakeup_at
        if wakeup is None or now < wakeup:
            return self._take()
        try:
            if self.phase == "first_token":
                self._first_token_timer(now)
            elif self.phase == "streaming":
                self._flush()
                winner = self.race.winner
                assert winner is not None
                winner.stalled = True
                self._hand_over(winner, "stalled", now)
            elif self.phase == "continuing":
                assert self._heir is not None
                self._heir.stalled = True
                self._cancel(self._heir)
                self._next_heir(now)
        except RaceFailed as failure:
            self._fail(failure)
        return self._take()

    def on_cancel(self, now: float) -> list[Command]:
        """The client left (or the race must stop): stop every host and settle, the probes
        too (a probe not yet at its deadline is not a no-show)."""
        self._mark_silent(now)
        for attempt in list(self._watched):
            if attempt is not self.race.dueling:
                self._cancel(attempt)
            attempt.watched_until = None
        self._watched = []
        if self.phase == "probing":
            self._settle()
        elif not self.done:
            self._end()
        return self._take()

    def flush(self) -> list[Command]:
        """Send the text relayed so far as one delta (after a batch of chunks)."""
        if not self.done:
            self._flush()
        return self._take()

    # -- the first token -------------------------------------------------------------------

    def _first_token_chunk(self, attempt: Attempt, chunk: HostChunk, now: float) -> None:
        kind = chunk.WhichOneof("event")
        if kind == "accepted":
            attempt.accepted = True
        elif kind in ("token", "finished"):
            attempt.accepted = True
            attempt.first_token_at = now
            if kind == "token":
                attempt.output_tokens += 1
            self._won(attempt, now)
            self._winner_chunk(attempt, chunk, now)
        else:
            if chunk.failed.code == ERROR_CODE_REQUEST_REJECTED:
                raise rejected(attempt, chunk.failed)
            attempt.failed = True
            self._busy += chunk.failed.code == ERROR_CODE_HOST_BUSY
            if any(not a.failed for a in self.race.attempts.values()):
                return
            # Every host so far said no: do not wait for a timer to try the next.
            if self._hedged:
                self._launch_hedged(now)
            elif not self._launch_fallback(now):
                code = ERROR_CODE_HOST_BUSY if self._busy else ERROR_CODE_HOST_FAILED
                raise RaceFailed(code, f"every raced host failed: {chunk.failed.message}")

    def _first_token_timer(self, now: float) -> None:
        race = self.race
        if self._hedged and now >= race.started + self._hedge_s:
            self._launch_hedged(now)
        self._mark_silent(now)
        if not race.deadline_hit and now >= race.started + self._deadline_s:
            race.deadline_hit = True
            self._launch_fallback(now)
        if now >= race.started + self._deadline_s + race.fallback_timeout_s:
            raise RaceFailed(
                ERROR_CODE_DEADLINE_EXCEEDED,
                f"no host produced a first token within {self._deadline_s:.3f} s "
                "and the fallback did not either",
            )

    def _won(self, winner: Attempt, now: float) -> None:
        race = self.race
        race.winner = winner
        race.first_token_at = winner.first_token_at
        # A judge compares texts: an embedding has none to judge.
        if self._duels is not None and race.assignment.request.kind != TASK_KIND_EMBEDDING:
            self._open_duel(winner)
        self._mark_silent(now)
        for loser in self._live_losers(winner):
            # A loser the duel took, or one sampled, runs on off the client's path until its
            # first token or its own deadline: a host that accepts and stays silent is seen
            # even when another host answers first, and a slow honest one shows its token.
            if loser is race.dueling or (self._probe is not None and self._probe()):
                self._watch(loser)
        self._cancel_all(keep=winner)
        request = race.assignment.request
        path = REQUEST_PATH_FALLBACK if winner.role == ATTEMPT_ROLE_FALLBACK else request.path
        started = ClientStarted(
            path=path,
            model=winner.host.model,
            plan_decision=request.plan.decision,
            host_id=winner.host.host_id,
            racer_instance_id=self._racer_id,
        )
        self._out.append(Emit(ClientEvent(started=started)))
        self.phase = "streaming"

    def _open_duel(self, winner: Attempt) -> None:
        assert self._duels is not None
        race = self.race
        # Offered even with no loser: the sampler decides first, as it always has.
        taken = self._duels.open(duel_offer(race, winner))
        loser = race.attempts.get(taken) if taken is not None else None
        if loser is not None:
            race.dueling, race.duel_winner = loser, winner
            self._out.append(HandToDuel(loser))

    # -- silence: no-shows, and losers watched until their first token ------------------------

    def _grace_s(self, attempt: Attempt) -> float:
        """How long an attempt may take to its first token before it is a no-show."""
        if attempt.role == ATTEMPT_ROLE_FALLBACK:
            return self.race.fallback_timeout_s
        return self._deadline_s

    def _mark_silent(self, now: float) -> None:
        """Every attempt still live past its own first-token deadline with no token is a
        no-show (a late first token clears it: report.py)."""
        for attempt in self.race.attempts.values():
            if (
                attempt.role != ATTEMPT_ROLE_CONTINUATION
                and attempt.first_token_at is None
                and not (attempt.failed or attempt.cancelled or attempt.stalled)
                and now - attempt.launched_at >= self._grace_s(attempt)
            ):
                attempt.no_show = True

    def _live_losers(self, winner: Attempt) -> list[Attempt]:
        return [
            a
            for a in self.race.attempts.values()
            if a is not winner
            and a.first_token_at is None
            and not (a.failed or a.cancelled or a.stalled or a.no_show)
        ]

    def _watch(self, attempt: Attempt) -> None:
        attempt.watched_until = attempt.launched_at + self._grace_s(attempt)
        self._watched.append(attempt)

    def _unwatch(self, attempt: Attempt) -> None:
        attempt.watched_until = None
        if attempt in self._watched:
            self._watched.remove(attempt)
        if self.phase == "probing" and not self._watched:
            self._settle()

    def _watched_chunk(self, attempt: Attempt, chunk: HostChunk, now: float) -> None:
        """A watched loser spoke: a token (or the end) in time clears it; a failure ends the
        watch as a failure. A probe is cancelled then; a duel's loser runs on for its duel."""
        kind = chunk.WhichOneof("event")
        if kind == "accepted":
            attempt.accepted = True
            return
        if kind == "failed":
            if attempt is not self.race.dueling:
                attempt.failed = True
        elif attempt.first_token_at is None:
            attempt.accepted = True
            attempt.first_token_at = now
            # A duel's loser is counted by its duel; a probe's token is its own.
            attempt.output_tokens += kind == "token" and attempt is not self.race.dueling
        if attempt is not self.race.dueling and not attempt.failed:
            self._cancel(attempt)
        self._unwatch(attempt)

    def _expire_watched(self, now: float) -> None:
        for attempt in list(self._watched):
            if attempt.watched_until is not None and now >= attempt.watched_until:
                # One the racer cancelled meanwhile (its duel dropped) missed nothing.
                attempt.no_show = attempt.first_token_at is None and not attempt.cancelled
                if attempt is not self.race.dueling:
                    self._cancel(attempt)
                self._unwatch(attempt)

    # -- streaming -------------------------------------------------------------------------

    def _winner_chunk(self, winner: Attempt, chunk: HostChunk, now: float) -> None:
        race = self.race
        self._progress_at = now
        kind = chunk.WhichOneof("event")
        max_tokens = self._max_tokens
        if kind == "token" and max_tokens and race.client_tokens >= max_tokens:
            # Past the answer's budget: cut here, stop the host, count it against it.
            winner.output_tokens -= 1  # the cut token is not the host's
            self._cut(winner)
        elif kind == "token":
            if winner.last_token_at and now - winner.last_token_at > winner.longest_pause_s:
                winner.longest_pause_s = now - winner.last_token_at
            winner.last_token_at = now
            winner.contributed = True
            race.client_tokens += 1
            winner.delivered += 1
            if not self._answer.token(winner, chunk.token):
                self._cut(winner)
        elif kind == "finished":
            self._answer.finish(winner)
            self._finish(winner, chunk.finished.finish_reason, chunk.finished.usage)
        elif kind == "failed":
            self._flush()
            if chunk.failed.code == ERROR_CODE_REQUEST_REJECTED:
                raise rejected(winner, chunk.failed)
            winner.failed = True
            self._hand_over(winner, chunk.failed.message, now)

    def _cut(self, winner: Attempt) -> None:
        """Stop a host that broke the answer's budget; the answer ends there, "length"."""
        winner.violations += 1
        self._cancel(winner)
        self._answer.finish(winner)
        # The host never reported this stream's usage: what was counted, and the prompt ceiling.
        usage = Usage(input_tokens=winner.prompt_tokens, output_tokens=winner.output_tokens)
        self._finish(winner, "length", usage, claimed=False)

    def _finish(
        self, winner: Attempt, finish_reason: str, reported: Usage, *, claimed: bool = True
    ) -> None:
        """The answer is done; `reported` is the host's usage claim, or (claimed=False) the
        racer's own count when it cut the host off."""
        race = self.race
        self._flush()
        params = race.assignment.request.params
        winner.usage = billed_usage(winner, reported, params.stop)
        if claimed:
            winner.claimed_usage = reported
        if claimed and overclaimed(winner, reported, params):
            # Billed on the racer's count all the same; the lie itself is an error in S(h)
            # and costs stake (docs/SECURITY.md).
            winner.usage_overclaimed = True
            winner.violations += 1
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
        finished = ClientFinished(finish_reason=finish_reason, usage=usage)
        self._out.append(Emit(ClientEvent(finished=finished)))
        race.winner = winner
        self._end()

    def _count(self, attempt: Attempt, chunk: HostChunk) -> bool:
        """Count a chunk to its attempt; True if it says more than `accepted` (which is no
        token, and no failure either)."""
        kind = chunk.WhichOneof("event")
        if kind == "accepted":
            attempt.accepted = True
            return False
        if kind == "token":
            attempt.accepted = True
            attempt.output_tokens += 1
        elif kind == "finished":
            attempt.accepted = True
        elif (
            attempt is not self.race.winner
            and attempt is not self._heir
            and chunk.failed.code == ERROR_CODE_HOST_BUSY
        ):
            # A "busy" that lands after the race was won still says the host's load was false.
            attempt.failed = True
        return True

    # -- continuation ----------------------------------------------------------------------

    def _hand_over(self, broken: Attempt, why: str, now: float) -> None:
        """Start a spare host on the emitted prefix."""
        self._cancel(broken)
        if self.race.tool_calls_sent:
            # Another host cannot finish this one's tool-call JSON: fail clearly, never splice.
            raise RaceFailed(
                ERROR_CODE_HOST_FAILED,
                f"the stream broke inside a tool call ({why}); "
                "tool calls are never continued on another host",
            )
        if self.race.continuations >= self._max_continuations:
            raise RaceFailed(ERROR_CODE_HOST_FAILED, f"the stream broke ({why}); no retries left")
        self._why = why
        self._next_heir(now)

    def _next_heir(self, now: float) -> None:
        race = self.race
        host = self.race.take_spare(ATTEMPT_ROLE_CONTINUATION)
        if host is None:
            raise RaceFailed(
                ERROR_CODE_HOST_FAILED,
                f"the stream broke ({self._why}) and no host can continue it",
            )
        race.continuations += 1
        request = race.assignment.request
        plan = plan_handover(
            request.messages,
            "".join(race.emitted),
            host,
            raw_prompt=request.kind == TASK_KIND_TEXT_COMPLETION,
        )
        self._heir = self._launch(host, ATTEMPT_ROLE_CONTINUATION, now, plan.messages)
        self._heir_deadline = now + race.fallback_timeout_s
        self._seam = plan.seam
        self.phase = "continuing"

    def _heir_chunk(self, heir: Attempt, chunk: HostChunk, now: float) -> None:
        if chunk.HasField("failed"):
            heir.failed = True
            # Our continuation prompt, not the client's: refused, not failed.
            heir.rejected = chunk.failed.code == ERROR_CODE_REQUEST_REJECTED
            self._cancel(heir)
            self._next_heir(now)
            return
        heir.first_token_at = now
        self._heir = None
        self.race.winner = heir
        self._answer.restart(self._seam)
        self.phase = "streaming"
        self._winner_chunk(heir, chunk, now)

    # -- commands --------------------------------------------------------------------------

    def _launch(
        self,
        host: HostCandidate,
        role: AttemptRole.ValueType,
        now: float,
        messages: list[ChatMessage] | None = None,
    ) -> Attempt:
        attempt = Attempt(self._new_id(), host, role, now)
        self.race.attempts[attempt.attempt_id] = attempt
        task = host_task(self.race, attempt, messages)
        self._out.append(Launch(attempt, task))
        return attempt

    def _launch_hedged(self, now: float) -> None:
        for host in self._hedged:
            self._launch(host, ATTEMPT_ROLE_HEDGE, now)
        self._hedged = []

    def _launch_fallback(self, now: float) -> bool:
        host = self.race.take_spare(ATTEMPT_ROLE_FALLBACK)
        if host is None:
            return False
        self._launch(host, ATTEMPT_ROLE_FALLBACK, now)
        return True

    def _cancel(self, attempt: Attempt) -> None:
        attempt.cancelled = True
        self._out.append(Cancel(attempt))

    def _cancel_all(self, keep: Attempt | None) -> None:
        race = self.race
        for attempt in race.attempts.values():
            if (
                attempt is not keep
                and attempt is not race.dueling
                and attempt.watched_until is None
                and attempt.usage is None
                and not attempt.failed
                and not attempt.cancelled
            ):
                self._cancel(attempt)

    def _flush(self) -> None:
        deltas = self._answer.take()
        if deltas:
            deltas[0].tokens = self.race.client_tokens - self._relayed_tokens
            self._relayed_tokens = self.race.client_tokens
        for delta in deltas:
            self._out.append(Emit(ClientEvent(delta=delta)))

    def _fail(self, failure: RaceFailed) -> None:
        self._flush()
        self.race.error = failure.code
        self._out.append(Emit(ClientEvent(failed=failure.detail)))
        self._end()

    def _end(self) -> None:
        """The client's answer is over: settle, once no watched loser is left to wait for."""
        race = self.race
        if race.dueling is not None:
            clean = race.duel_clean
            self._out.append(CloseDuel(race.dueling, "".join(race.emitted) if clean else None))
            if not clean:
                dropped, race.dueling = race.dueling, None
                if dropped.watched_until is not None:
                    self._watched.remove(dropped)
                    dropped.watched_until = None
        self._cancel_all(keep=None)
        if self._watched:
            self.phase = "probing"
            return
        self._settle()

    def _settle(self) -> None:
        self.phase = "done"
        self._out.append(Settle(self.race))

    def _take(self) -> list[Command]:
        out, self._out = self._out, []
        return out
