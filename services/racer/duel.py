"""The duel runner (WWW.Serve 4.2): a sampled race's loser is left to finish, off the client's
path; k judges, drawn by stake from the other hosts, compare the two full answers, each twice
with the positions swapped, as ordinary HostTasks; the DuelResult goes to the settlements
stream, where accounting pays for it and every dispatcher turns it into host quality."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.answer_text import MAX_CHARS_PER_TOKEN, MAX_CHUNK_CHARS, Sanitizer
from llooma.duel import (
    JUDGE_MAX_TOKENS,
    Contender,
    DuelOffer,
    Verdict,
    judge_messages,
    outcome,
    parse_verdict,
    pick_judges,
    should_duel,
    unswap,
)
from llooma.membership import HostDirectory
from llooma.scoring import Candidate
from llooma.selection import Ask, Selector
from llooma.settings import Settings
from llooma.v1.common_pb2 import ChatMessage, GenerationParams
from llooma.v1.duel_pb2 import DUEL_VERDICT_A, DUEL_VERDICT_UNSPECIFIED, DuelResult, JudgeVote
from llooma.v1.host_pb2 import CancelTask, HostChunk, HostTask
from llooma.v1.pipeline_pb2 import ChatRequest

log = logging.getLogger(__name__)

# Duels are a sample and cost host time: past this many at once, races are not sampled.
MAX_CONCURRENT_DUELS = 64
# The text cap of a duel answer whose request set no max_tokens, in tokens.
MAX_ANSWER_TOKENS = 8192


@dataclass(slots=True)
class Answer:
    """One host's stream in a duel: the loser's answer, or one judge's reading. It passes the
    same containment as a race's answer; a host that breaks a rule forfeits."""

    attempt_id: str
    host_id: str
    max_tokens: int = 0
    text: list[str] = field(default_factory=list)
    output_tokens: int = 0
    chars: int = 0
    failed: bool = False
    forfeited: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    sanitizer: Sanitizer = field(default_factory=Sanitizer)

    def feed(self, chunk: HostChunk) -> None:
        if self.done.is_set():
            return
        kind = chunk.WhichOneof("event")
        if kind == "token":
            self.output_tokens += 1
            raw = chunk.token.text
            if len(raw) > MAX_CHUNK_CHARS or (
                self.max_tokens and self.output_tokens > self.max_tokens
            ):
                self._forfeit()
                return
            self._add(self.sanitizer.feed(raw))
        elif kind == "finished":
            self._add(self.sanitizer.flush())
            self.done.set()
        elif kind == "failed":
            self.failed = True
            self.done.set()

    def _add(self, piece: str) -> None:
        self.chars += len(piece)
        limit = (self.max_tokens or MAX_ANSWER_TOKENS) * MAX_CHARS_PER_TOKEN
        if self.sanitizer.removed or self.chars > limit:
            self._forfeit()
        elif piece:
            self.text.append(piece)

    def _forfeit(self) -> None:
        self.failed = self.forfeited = True
        self.done.set()


@dataclass(slots=True)
class Duel:
    duel_id: str
    task_id: str
    request: ChatRequest
    winner: Contender
    loser: Answer
    judges: list[Candidate]
    opened: float


class Duels:
    """Samples races for duels and runs them. The racer offers each race at its first token
    (`open`), passes on the chunks of the loser it took (`feed`, and `on_chunk` for any attempt
    that is not, or no longer, a race's) and says at the race's end whether the winner's whole
    answer went out (`close`)."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        instance_id: str,
        hosts: HostDirectory,
        settings: Settings,
        rng: random.Random | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._instance_id = instance_id
        self._hosts = hosts
        self._settings = settings
        self._rng = rng or random.Random()
        self._selector = Selector.from_settings(settings)
        self._routes: dict[str, Answer] = {}
        self._open: dict[str, Duel] = {}
        self._running: set[asyncio.Task[None]] = set()

    # -- the racer's interface ----------------------------------------------------------------

    def open(self, offer: DuelOffer) -> str | None:
        """Maybe sample this race; if so take one live loser's stream away from it (the racer
        must route its chunks here and not cancel it); returns that loser's attempt id."""
        if len(self._open) + len(self._running) >= MAX_CONCURRENT_DUELS:
            return None
        if not should_duel(self._rng, self._settings.duel_fraction):
            return None
        if not offer.losers:
            return None
        if offer.request.params.tools_json:
            # Its answer may be tool calls, which a judge comparing two texts cannot read.
            return None
        loser = self._rng.choice(offer.losers)
        judges = self._judges(offer.winner.model, {offer.winner.host_id, loser.host_id})
        if not judges:
            return None  # nobody but the duelists could judge: let the race go as usual
        answer = Answer(loser.attempt_id, loser.host_id, max_tokens=offer.request.params.max_tokens)
        self._routes[loser.attempt_id] = answer
        duel_id = f"{offer.task_id}.duel"
        self._open[loser.attempt_id] = Duel(
            duel_id, offer.task_id, offer.request, offer.winner, answer, judges, time.monotonic()
        )
        return loser.attempt_id

    def feed(self, attempt_id: str, chunk: HostChunk) -> None:
        """A chunk of a duel's stream (the loser's, or a judge's)."""
        answer = self._routes.get(attempt_id)
        if answer is not None:
            answer.feed(chunk)

    def close(self, loser_attempt_id: str, winner_text: str | None) -> bool:
        """At the race's end: judge on the winner's whole answer, or drop the duel when it did
        not reach the client untouched (winner_text None). False when the loser is the
        racer's to cancel again."""
        duel = self._open.pop(loser_attempt_id, None)
        if duel is None or winner_text is None:
            self._routes.pop(loser_attempt_id, None)
            return False
        task = asyncio.create_task(self._run(duel, winner_text), name=duel.duel_id)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return True

    async def on_chunk(self, msg: Msg) -> None:
        answer = self._routes.get(subjects.host_reply_attempt_id(msg.subject))
        if answer is None:
            return
        try:
            chunk = HostChunk.FromString(msg.data)
        except Exception:
            answer.failed = True
            answer.done.set()
            return
        answer.feed(chunk)

    async def stop(self) -> None:
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(self._running, timeout=5)

    # -- the duel ------------------------------------------------------------------------------

    def _judges(self, model: str, duelists: set[str]) -> list[Candidate]:
        judge_model = self._settings.duel_judge_model or model
        # The same filters as every race (suspended, engine unreachable, ...); judges are then
        # drawn by stake alone.
        found = self._selector.candidates(self._hosts.members.all(), Ask(judge_model))
        return pick_judges(found, duelists, self._settings.duel_judges, self._rng)

    async def _run(self, duel: Duel, winner_text: str) -> None:
        readings: list[tuple[Answer, Answer]] = []
        deadline = duel.opened + self._settings.duel_timeout_s
        try:
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    await duel.loser.done.wait()
            except TimeoutError:
                duel.loser.failed = True
            if duel.loser.forfeited:
                # It broke a rule: the winner's answer is the better one, no judge needed.
                forfeit = self._result(duel)
                forfeit.outcome = DUEL_VERDICT_A
                forfeit.finished_unix_nanos = time.time_ns()
                await bus.hand_off(
                    self._js, subjects.SETTLEMENT_DUEL, forfeit.SerializeToString(), duel.duel_id
                )
                return
            if duel.loser.failed:
                log.debug("duel %s dropped: the loser did not finish", duel.duel_id)
                return
            result = self._result(duel)
            winner_is_a = self._rng.random() < 0.5
            loser_text = "".join(duel.loser.text)
            answer_a, answer_b = (
                (winner_text, loser_text) if winner_is_a else (loser_text, winner_text)
            )
            if not winner_is_a:
                result.host_a, result.host_b = result.host_b, result.host_a
                result.attempt_a, result.attempt_b = result.attempt_b, result.attempt_a
            nonce = uuid.uuid4().hex[:12]
            conversation = duel.request.messages
            for judge in duel.judges:
                as_shown = judge_messages(conversation, answer_a, answer_b, nonce)
                reversed_ = judge_messages(conversation, answer_b, answer_a, nonce)
                readings.append(
                    (await self._ask(judge, as_shown), await self._ask(judge, reversed_))
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(_loop_time(deadline)):
                    for in_order, swapped in readings:
                        await in_order.done.wait()
                        await swapped.done.wait()
            for in_order, swapped in readings:
                result.votes.append(
                    JudgeVote(
                        judge_host_id=in_order.host_id,
                        verdict_in_order=_verdict(in_order),
                        verdict_swapped=unswap(_verdict(swapped)),
                        attempt_id_in_order=in_order.attempt_id,
                        attempt_id_swapped=swapped.attempt_id,
                        output_tokens=in_order.output_tokens + swapped.output_tokens,
                    )
                )
            result.outcome = outcome(result.votes)
            result.finished_unix_nanos = time.time_ns()
            await bus.hand_off(
                self._js, subjects.SETTLEMENT_DUEL, result.SerializeToString(), duel.duel_id
            )
            log.debug(
                "duel %s: loser %d tokens, judges %d output tokens",
                duel.duel_id,
                duel.loser.output_tokens,
                sum(v.output_tokens for v in result.votes),
            )
        except Exception:
            log.exception("duel %s failed", duel.duel_id)
        finally:
            for answer in [duel.loser, *(a for pair in readings for a in pair)]:
                self._routes.pop(answer.attempt_id, None)
                if not answer.done.is_set():
                    await self._cancel(answer)

    def _result(self, duel: Duel) -> DuelResult:
        return DuelResult(
            duel_id=duel.duel_id,
            request_id=duel.request.request_id,
            task_id=duel.task_id,
            model=duel.winner.model,
            host_a=duel.winner.host_id,
            host_b=duel.loser.host_id,
            attempt_a=duel.winner.attempt_id,
            attempt_b=duel.loser.attempt_id,
            api_key_id=duel.request.api_key_id,
        )

    async def _ask(self, judge: Candidate, messages: list[ChatMessage]) -> Answer:
        answer = Answer(uuid.uuid4().hex, judge.host_id, max_tokens=JUDGE_MAX_TOKENS)
        self._routes[answer.attempt_id] = answer
        task = HostTask(
            attempt_id=answer.attempt_id,
            model=judge.model,
            messages=messages,
            params=GenerationParams(max_tokens=JUDGE_MAX_TOKENS),
        )
        await self._nc.publish(
            subjects.host_task(judge.model, judge.host_id),
            task.SerializeToString(),
            reply=subjects.host_reply(self._instance_id, answer.attempt_id),
        )
        return answer

    async def _cancel(self, answer: Answer) -> None:
        with contextlib.suppress(Exception):
            await self._nc.publish(
                subjects.host_cancel(answer.host_id),
                CancelTask(attempt_id=answer.attempt_id).SerializeToString(),
            )


def _verdict(answer: Answer) -> Verdict:
    return DUEL_VERDICT_UNSPECIFIED if answer.failed else parse_verdict("".join(answer.text))


def _loop_time(monotonic_deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (monotonic_deadline - time.monotonic())
