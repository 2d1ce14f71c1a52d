"""Duel-and-judge on a running stack (real NATS, real processes): a stack of its own with
p_d = 1 and a best bucket of 2 (so S(h) alone decides who races), and the shared stack (p_d = 0).

Hosts that must never race but may judge announce a high load: the dispatcher's best bucket
leaves them out, while judges are drawn by stake whatever their score."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import bus, subjects
from llooma.duel import read_judge_prompt
from llooma.host.config import Generation, HostConfig, Latency, ModelConfig
from llooma.processes import free_port
from llooma.settings import VERSION
from llooma.stack import Stack
from llooma.v1.common_pb2 import ERROR_CODE_HOST_BUSY, ErrorDetail, Usage
from llooma.v1.duel_pb2 import (
    DUEL_VERDICT_A,
    DUEL_VERDICT_B,
    DUEL_VERDICT_TIE,
    DUEL_VERDICT_UNSPECIFIED,
    DuelResult,
)
from llooma.v1.host_pb2 import (
    CancelTask,
    HostChunk,
    HostFinished,
    HostHeartbeat,
    HostTask,
    HostToken,
    ModelCapability,
)
from llooma.v1.race_pb2 import RaceEvent
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_LOST
from tests.stack.test_race import chat, stream_text, wait_listed
from tests.support.ledger_db import new_database
from tests.support.scripted_host import Reply, Script, ScriptedHost

GOOD = "A careful answer that explains the point with a worked example and a short summary."
BAD = "Unrelated words, then a wrong claim stated with confidence, and it goes on for a while."
GRADED = "graded"
GOOD_HOSTS = ("good-1", "good-2", "good-3")
BAD_HOST = "bad-1"
# Races while the dispatcher learns the bad host's quality, then races measured after.
RACES_BEFORE = 10
RACES_AFTER = 15


def graded_host(name: str, quality: float, first_token_ms: float, seed: int) -> HostConfig:
    model = ModelConfig(
        name=GRADED,
        quality=quality,
        generation=Generation(max_tokens=24),
        first_token=Latency(ms=first_token_ms),
        inter_token=Latency(ms=2),
    )
    # Its own model, raced alone: a first latency record, so S(h) starts even for all four.
    warm_up = model.model_copy(update={"name": f"warm-{name}"})
    return HostConfig(name=name, seed=seed, models=[model, warm_up])


@pytest.fixture(scope="module")
def duel_stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The bad host is the fastest: on latency alone S(h) would race it nearly every time.
    hosts = [graded_host(name, 1.0, 300, seed) for seed, name in enumerate(GOOD_HOSTS, start=1)]
    hosts.append(graded_host(BAD_HOST, 0.4, 20, 9))
    stack = Stack(
        root=tmp_path_factory.mktemp("duel-stack"),
        http_port=free_port(),
        database_url=new_database(database_url, "duel"),
        hosts=hosts,
        extra_env={
            "LLOOMA_DUEL_FRACTION": "1.0",
            "LLOOMA_BEST_BUCKET_SIZE": "2",
            # Scripted judges announce the stakes they are drawn by and lock none.
            "LLOOMA_UNSTAKED_HOST_STAKE": "1000",
        },
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
async def duel_http(duel_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=duel_stack.base_url, timeout=30.0) as client:
        yield client


@pytest.fixture
async def duel_nc(duel_stack: Stack) -> AsyncIterator[Client]:
    assert duel_stack.nats_url is not None
    client = await bus.connect(
        duel_stack.nats_url, "llooma-duel-tests", nkey_seed_file=duel_stack.control_seed
    )
    yield client
    # Closed, not drained: a drain waits on every callback still queued, and a duel's watch
    # subscriptions may hold thousands of chunks when the test ends.
    await client.close()


@dataclass
class Watch:
    """What the stack publishes: duel results and race events by request, cancels by attempt,
    and every host chunk (to count what a duel costs)."""

    duels: dict[str, list[DuelResult]] = field(default_factory=lambda: defaultdict(list))
    races: dict[str, RaceEvent] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    tokens: Counter[str] = field(default_factory=Counter)
    input_tokens: dict[str, int] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)

    async def on_duel(self, msg: Msg) -> None:
        result = DuelResult.FromString(msg.data)
        self.duels[result.request_id].append(result)

    async def on_race(self, msg: Msg) -> None:
        event = RaceEvent.FromString(msg.data)
        self.races[event.request_id] = event

    async def on_cancel(self, msg: Msg) -> None:
        self.cancelled.add(CancelTask.FromString(msg.data).attempt_id)

    async def on_chunk(self, msg: Msg) -> None:
        chunk = HostChunk.FromString(msg.data)
        attempt_id = msg.subject.rpartition(".")[2]
        if chunk.HasField("token"):
            self.tokens[attempt_id] += 1
        elif chunk.HasField("finished"):
            self.input_tokens[attempt_id] = chunk.finished.usage.input_tokens
            self.finished_at[attempt_id] = time.monotonic()

    async def duel_for(self, request_id: str, timeout_s: float = 15.0) -> DuelResult:
        deadline = time.monotonic() + timeout_s
        while not self.duels.get(request_id):
            assert time.monotonic() < deadline, f"no duel result for {request_id}"
            await asyncio.sleep(0.02)
        return self.duels[request_id][0]

    async def race_for(self, request_id: str) -> RaceEvent:
        for _ in range(500):
            if request_id in self.races:
                return self.races[request_id]
            await asyncio.sleep(0.02)
        raise AssertionError(f"no race event for {request_id}")


async def watching(nc: Client) -> AsyncIterator[Watch]:
    watch = Watch()
    subscriptions = [
        await nc.subscribe(subjects.SETTLEMENT_DUEL, cb=watch.on_duel),
        await nc.subscribe(subjects.RACE_EVENT, cb=watch.on_race),
        await nc.subscribe(f"{subjects.PREFIX}.host.*.cancel", cb=watch.on_cancel),
        await nc.subscribe(f"{subjects.PREFIX}.tokens.>", cb=watch.on_chunk),
    ]
    await nc.flush()
    yield watch
    for subscription in subscriptions:
        await subscription.unsubscribe()


@pytest.fixture
async def watch(duel_nc: Client) -> AsyncIterator[Watch]:
    async for found in watching(duel_nc):
        yield found


@pytest.fixture
async def shared_watch(nc: Client) -> AsyncIterator[Watch]:
    async for found in watching(nc):
        yield found


class LoadedHost(ScriptedHost):
    """Announces itself nine-tenths busy: never in a best bucket of 2, still a judge."""

    async def heartbeat(self) -> None:
        beat = HostHeartbeat(
            version=VERSION,
            models=[ModelCapability(name=self.model, capacity=64, stake=self.stake)],
            load=0.9,
            stake=self.stake,
            sent_unix_nanos=time.time_ns(),
            draining=self.draining,
        )
        await self.nc.publish(
            subjects.kv_put_subject(subjects.HOSTS_BUCKET, self.host_id), beat.SerializeToString()
        )
        await self.nc.flush()


def answering(text: str, first_s: float, gap_s: float) -> Script:
    async def script(_: HostTask, reply: Reply) -> None:
        await asyncio.sleep(first_s)
        words = text.split(" ")
        for index, word in enumerate(words):
            if index:
                await asyncio.sleep(gap_s)
            await reply(
                HostChunk(seq=index + 1, token=HostToken(text=word if not index else " " + word))
            )
        usage = Usage(input_tokens=3, output_tokens=len(words))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop", usage=usage)))

    return script


@dataclass
class Judge:
    """A judge that prefers the answer containing `prefers`, or (garbage) says no verdict."""

    prefers: str = GOOD
    garbage: bool = False
    seen: list[tuple[str, str]] = field(default_factory=list)

    async def __call__(self, task: HostTask, reply: Reply) -> None:
        judged = read_judge_prompt(task.messages)
        if judged is None:
            busy = ErrorDetail(code=ERROR_CODE_HOST_BUSY, message="judging only")
            await reply(HostChunk(failed=busy))
            return
        self.seen.append(judged)
        first, second = judged
        verdict = "A" if self.prefers == first else "B" if self.prefers == second else "tie"
        text = "I liked the first one best." if self.garbage else f'{{"verdict": "{verdict}"}}'
        await reply(HostChunk(seq=1, token=HostToken(text=text)))
        usage = Usage(input_tokens=50, output_tokens=1)
        await reply(HostChunk(seq=2, finished=HostFinished(finish_reason="stop", usage=usage)))


@dataclass
class Arena:
    """Two duelists (the good one first to answer) and loaded judges, all on one new model."""

    nc: Client
    judges: list[Judge]
    judge_stake: float = 1.0
    model: str = field(default_factory=lambda: f"arena-{uuid.uuid4().hex[:6]}")
    hosts: list[ScriptedHost] = field(default_factory=list)

    async def __aenter__(self) -> Arena:
        # The good host answers first and quickly; the bad one is slow to finish.
        self.hosts = [
            ScriptedHost(self.nc, f"quick-{self.model}", self.model, answering(GOOD, 0.02, 0.005)),
            ScriptedHost(self.nc, f"slow-{self.model}", self.model, answering(BAD, 0.15, 0.04)),
            *(
                LoadedHost(
                    self.nc, f"judge{i}-{self.model}", self.model, judge, stake=self.judge_stake
                )
                for i, judge in enumerate(self.judges)
            ),
        ]
        for host in self.hosts:
            await host.__aenter__()
        return self

    async def __aexit__(self, *_: object) -> None:
        for host in self.hosts:
            await host.__aexit__(None, None, None)

    @property
    def quick(self) -> str:
        return f"quick-{self.model}"

    @property
    def slow(self) -> str:
        return f"slow-{self.model}"


async def answer(http: httpx.AsyncClient, model: str) -> tuple[str, str, float]:
    """(request id, text, seconds until the client's stream ended) of one streamed request."""
    started = time.monotonic()
    request_id, text, _ = await stream_text(http, chat(model))
    return request_id, text, time.monotonic() - started


def side_of(result: DuelResult, host_id: str) -> int:
    return DUEL_VERDICT_A if result.host_a == host_id else DUEL_VERDICT_B


async def test_a_sampled_race_lets_the_loser_finish_and_k_judges_read_both_orders(
    duel_http: httpx.AsyncClient, duel_nc: Client, watch: Watch
) -> None:
    judges = [Judge() for _ in range(4)]
    async with Arena(duel_nc, judges) as arena:
        await wait_listed(duel_http, arena.model, hosts=6)
        request_id, text, _ = await answer(duel_http, arena.model)
        client_done = time.monotonic()
        result = await watch.duel_for(request_id)
        await asyncio.sleep(0.5)  # a second publication would arrive by now
    race = await watch.race_for(request_id)
    # The client had the winner's answer only, and had all of it before the loser finished
    # (the loser needs 0.15 s + 15 x 0.04 s).
    assert race.winner_host_id == arena.quick
    assert text == GOOD
    assert len(watch.duels[request_id]) == 1
    assert {result.host_a, result.host_b} == {arena.quick, arena.slow}
    assert result.task_id == race.task_id
    loser_attempt = result.attempt_b if result.host_b == arena.slow else result.attempt_a
    # Ordered events, not a wall-clock bound: the client's stream closed before the loser sent
    # its last chunk, so the duel never held the client back.
    assert client_done < watch.finished_at[loser_attempt]
    assert loser_attempt not in watch.cancelled
    # Exactly k = 3 of the 4 judges were asked, each twice, the second time swapped, and
    # what they read was both full answers.
    asked = [j for j in judges if j.seen]
    assert len(asked) == 3
    for judge in asked:
        assert len(judge.seen) == 2
        (first_a, first_b), (second_a, second_b) = judge.seen
        assert (first_a, first_b) == (second_b, second_a)
        assert {first_a, first_b} == {GOOD, BAD}
    judge_ids = {vote.judge_host_id for vote in result.votes}
    assert len(result.votes) == 3 == len(judge_ids)
    assert not judge_ids & {arena.quick, arena.slow}
    good_side = side_of(result, arena.quick)
    for vote in result.votes:
        assert vote.verdict_in_order == vote.verdict_swapped == good_side
        assert vote.attempt_id_in_order != vote.attempt_id_swapped
    assert result.outcome == good_side


async def test_a_judge_that_returns_garbage_abstains_and_the_duel_goes_on(
    duel_http: httpx.AsyncClient, duel_nc: Client, watch: Watch
) -> None:
    judges = [Judge(), Judge(garbage=True), Judge(prefers=BAD)]
    async with Arena(duel_nc, judges) as arena:
        await wait_listed(duel_http, arena.model, hosts=5)
        request_id, text, _ = await answer(duel_http, arena.model)
        result = await watch.duel_for(request_id)
    assert text == GOOD
    by_judge = {vote.judge_host_id: vote for vote in result.votes}
    garbage = by_judge[arena.hosts[3].host_id]
    assert garbage.verdict_in_order == garbage.verdict_swapped == DUEL_VERDICT_UNSPECIFIED
    good_side = side_of(result, arena.quick)
    assert by_judge[arena.hosts[2].host_id].verdict_in_order == good_side
    assert by_judge[arena.hosts[4].host_id].verdict_swapped != good_side
    # One vote each way and one abstention: a tie.
    assert result.outcome == DUEL_VERDICT_TIE


async def test_a_worse_host_loses_its_duels_and_is_raced_less_often(
    duel_http: httpx.AsyncClient, watch: Watch
) -> None:
    await wait_listed(duel_http, GRADED, hosts=4)
    for name in (*GOOD_HOSTS, BAD_HOST):
        request_id, _, _ = await answer(duel_http, f"warm-{name}")
        await watch.race_for(request_id)
    # The bad host warmed up last: its heartbeat may still show that task running, and a
    # busy host drops out of a best bucket of 2 (busy hosts beat every 0.5 s).
    await asyncio.sleep(1.2)
    raced: list[bool] = []
    bad_duels: list[float] = []
    costs: list[tuple[int, int, int, int]] = []
    for _ in range(RACES_BEFORE + RACES_AFTER):
        request_id, _, _ = await answer(duel_http, GRADED)
        race = await watch.race_for(request_id)
        result = await watch.duel_for(request_id)
        raced.append(BAD_HOST in {a.host_id for a in race.attempts})
        if BAD_HOST in (result.host_a, result.host_b):
            bad_duels.append(
                {DUEL_VERDICT_TIE: 0.5, side_of(result, BAD_HOST): 1.0}.get(result.outcome, 0.0)
            )
        else:
            assert result.outcome == DUEL_VERDICT_TIE  # two perfect hosts
        loser = result.attempt_b if result.host_a == race.winner_host_id else result.attempt_a
        raced_tokens = next(a.output_tokens for a in race.attempts if a.attempt_id == loser)
        judge_attempts = [
            a for v in result.votes for a in (v.attempt_id_in_order, v.attempt_id_swapped)
        ]
        costs.append(
            (
                watch.tokens[loser] - raced_tokens,
                sum(v.output_tokens for v in result.votes),
                sum(watch.input_tokens.get(a, 0) for a in judge_attempts),
                race.output_tokens,
            )
        )
        # Let every heartbeat show the judges idle again: load is a term of S(h) too.
        await asyncio.sleep(0.6)
    assert bad_duels, "the bad host never raced"
    assert sum(bad_duels) == 0.0, bad_duels
    share_before = sum(raced[:RACES_BEFORE]) / RACES_BEFORE
    share_after = sum(raced[RACES_BEFORE:]) / RACES_AFTER
    loser_extra, judge_out, judge_in, client = (
        sum(c[i] for c in costs) / len(costs) for i in range(4)
    )
    print(
        f"\nbad host raced in {share_before:.2f} of the first {RACES_BEFORE} races, "
        f"{share_after:.2f} of the next {RACES_AFTER}; it lost {len(bad_duels)} duels; "
        f"per duel: loser "
        f"+{loser_extra:.1f} output tokens, judges {judge_out:.1f} output and {judge_in:.1f} "
        f"input tokens, against {client:.1f} output tokens for the client"
    )
    assert raced[0], "the fastest host is raced while its quality is unknown"
    assert share_after <= 0.2 < share_before
    assert judge_out > 0
    assert loser_extra > 0


async def test_with_p_d_zero_no_race_duels(
    http: httpx.AsyncClient, nc: Client, shared_watch: Watch
) -> None:
    """The shared stack runs with LLOOMA_DUEL_FRACTION=0."""
    judges = [Judge() for _ in range(3)]
    # No stake: the shared stack's best bucket (4) holds them, but the draw passes them over.
    async with Arena(nc, judges, judge_stake=0.0) as arena:
        await wait_listed(http, arena.model, hosts=5)
        request_ids = []
        for _ in range(4):
            request_id, _, _ = await answer(http, arena.model)
            request_ids.append(request_id)
        races = [await shared_watch.race_for(r) for r in request_ids]
        await asyncio.sleep(1.0)  # a loser left running would have finished, a duel been judged
    assert not any(j.seen for j in judges)
    assert not any(shared_watch.duels.get(r) for r in request_ids)
    # Loaded hosts may be raced here (a best bucket of 4) and say busy; every loser that
    # was still running was cancelled.
    losers = [a for race in races for a in race.attempts if a.outcome == ATTEMPT_OUTCOME_LOST]
    assert losers, races
    assert all(a.attempt_id in shared_watch.cancelled for a in losers)
