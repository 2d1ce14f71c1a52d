"""kill -9 of service processes at random moments with requests in flight (`pytest -s` prints
the figures reported in docs/RELIABILITY.md)."""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import asyncpg
import httpx
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import bus, subjects
from llooma.continuation import extract_prefix
from llooma.stack import SERVICES, Stack
from llooma.v1.common_pb2 import Usage
from llooma.v1.host_pb2 import HostChunk, HostFinished, HostTask, HostToken
from llooma.v1.pipeline_pb2 import DagResume
from llooma.v1.plan_pb2 import AggregationStart
from llooma.v1.race_pb2 import RaceRecord
from services.racer.takeover import RESUMED_TASK_SUFFIX
from tests.reliability.conftest import (
    AUTH,
    Load,
    audit_settlements,
    stack_fixture,
    tally,
    wait_healthy,
)
from tests.stack.test_race import wait_listed
from tests.stack.test_stake import ledger_cli
from tests.support.scripted_host import Reply, Script, ScriptedHost

ROUNDS = 2
# The services whose requests in hand JetStream redelivers to a live replica (ack after the
# handler, short ack_wait), and accounting, which acks only what Postgres committed.
LOSSLESS = ("privacy", "planner", "dispatcher", "accounting")


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(tmp_path_factory.mktemp("kills"))


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(
        tmp_path_factory.mktemp("replicas"), replicas=dict.fromkeys(LOSSLESS, 2)
    )


async def kill_and_restart(stack: Stack, name: str, rng: random.Random) -> None:
    stack.kill(name)
    # `llooma up` polls every 0.5 s: the restart comes somewhere in that window.
    await asyncio.sleep(rng.uniform(0.0, 0.5))
    assert name in stack.restart_crashed()


@pytest.mark.timeout(240)
async def test_kill_each_service_with_requests_in_flight(single: Stack) -> None:
    rng = random.Random(11)
    load = Load(single.base_url, concurrency=6)
    load.start()
    kills, in_flight = 0, []
    for _ in range(ROUNDS):
        for name in rng.sample(SERVICES, len(SERVICES)):
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            in_flight.append(load.in_flight())
            await kill_and_restart(single, name, rng)
            kills += 1
    await asyncio.sleep(2.0)
    results = await load.stop()
    recovery_s = await wait_healthy(single)
    counts = tally(results)
    audit = await audit_settlements(single)
    print(
        f"\nkills={kills} in_flight_at_kill={sum(in_flight)} requests={len(results)} "
        f"ends={counts} settlements={audit} recovery_s={recovery_s:.2f}"
    )
    # Every request ended: completed, or an error event / status, or (only for requests held by
    # a killed ingress) a dropped connection; none outlived its deadline.
    assert counts.get("hung", 0) == 0
    assert counts.get("unfinished", 0) == 0
    accepted = len(results) - counts.get("refused", 0)
    assert counts.get("completed", 0) > accepted // 2
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0


@pytest.mark.timeout(240)
async def test_a_replica_kill_costs_no_request(replicated: Stack) -> None:
    rng = random.Random(13)
    load = Load(replicated.base_url, concurrency=6)
    load.start()
    kills, in_flight = 0, []
    victims = [f"{name}-2" if rng.random() < 0.5 else name for name in LOSSLESS * 3]
    rng.shuffle(victims)
    for name in victims:
        await asyncio.sleep(rng.uniform(0.3, 1.2))
        in_flight.append(load.in_flight())
        await kill_and_restart(replicated, name, rng)
        kills += 1
    await asyncio.sleep(1.0)
    results = await load.stop()
    counts = tally(results)
    audit = await audit_settlements(replicated)
    print(
        f"\nreplica kills={kills} in_flight_at_kill={sum(in_flight)} requests={len(results)} "
        f"ends={counts} settlements={audit}"
    )
    assert counts == {"completed": len(results)}
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0


STORY = (
    "A racer holds the streams it relays in memory, and memory dies with its process. "
    "The ingress knows exactly what each client has read, so another racer can finish "
    "every answer from there, and the client never sees where one racer ended and the "
    "next began. Each attempt the dead racer launched is settled once, by whoever claims it."
)
RESUME_MODEL = "resume-model"


def storyteller(usage_seen: list[int]) -> Script:
    """Tells STORY a word every 0.15 s; asked to continue (a handover's prompt), tells the rest
    from the prefix it was given. Reports the chunks it sent as its usage."""

    async def script(task: HostTask, reply: Reply) -> None:
        prefix = extract_prefix(task.messages[-1].content)
        if prefix is not None:
            assert STORY.startswith(prefix), prefix
        rest = STORY if prefix is None else STORY[len(prefix) :]
        pause_s = 0.15 if prefix is None else 0.02
        words = rest.split(" ")
        for index, word in enumerate(words):
            await reply(HostChunk(token=HostToken(text=word if index == 0 else " " + word)))
            await asyncio.sleep(pause_s)
        usage = Usage(input_tokens=40, output_tokens=len(words))
        usage_seen.append(len(words))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop", usage=usage)))

    return script


@dataclass
class Told:
    """One request of the resume test: its text, when each piece came, how it ended."""

    stream: bool
    pieces: list[tuple[float, str]] = field(default_factory=list)
    text: str = ""
    request_id: str = ""
    finish_reason: str = ""
    error: str = ""


async def tell(
    http: httpx.AsyncClient,
    told: Told,
    enough: asyncio.Event,
    wanted: int,
    model: str = RESUME_MODEL,
) -> None:
    body = {
        "model": model,
        "stream": told.stream,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": f"tell the story {uuid.uuid4().hex}"}],
    }
    if not told.stream:
        reply = await http.post("/v1/chat/completions", json=body, headers=AUTH)
        told.request_id = reply.headers.get("x-llooma-request-id", "")
        answer = reply.json()
        if reply.status_code != 200:
            told.error = str(answer)
            return
        told.text = answer["choices"][0]["message"]["content"]
        told.finish_reason = answer["choices"][0]["finish_reason"]
        return
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as reply:
        told.request_id = reply.headers.get("x-llooma-request-id", "")
        if reply.status_code != 200:
            told.error = f"{reply.status_code}: {(await reply.aread()).decode()}"
            return
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = orjson.loads(line[6:])
            if "error" in event:
                told.error = str(event["error"])
                return
            choice = event["choices"][0]
            piece = choice["delta"].get("content") or ""
            if piece:
                told.pieces.append((time.monotonic(), piece))
                if len(told.pieces) == wanted:
                    enough.set()
            told.finish_reason = choice.get("finish_reason") or told.finish_reason
    told.text = "".join(piece for _, piece in told.pieces)


@pytest.fixture(scope="module")
def two_racers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(tmp_path_factory.mktemp("racers"), replicas={"racer": 2})


@pytest.mark.timeout(180)
async def test_a_killed_racers_answers_are_finished_on_the_other_racer(two_racers: Stack) -> None:
    """kill -9 of one of two racers while it relays streaming and non-streaming answers: the
    ingress sees it stop beating and asks the other racer to finish each answer from what the
    client received. Every answer is the host's exact text (no repeat, no gap, no error) and
    no pause exceeds the ingress's stall limit; the dead racer's races are settled by the
    racer that took them over (a won attempt for what the client received), the prompt is
    charged once per request, no task is won twice, and the ledger verifies."""
    stack = two_racers
    await wait_healthy(stack)
    assert stack.nats_url is not None
    # The ingress's limit between two events (stall + fallback + margin): the bound on the gap.
    stall_limit_s = 1.5 + 3.0 + 5.0
    usage_seen: list[int] = []
    nc = await bus.connect(stack.nats_url, "llooma-tests-resume", nkey_seed_file=stack.control_seed)
    streams = [Told(stream=True) for _ in range(6)]
    whole = [Told(stream=False) for _ in range(3)]
    try:
        async with (
            ScriptedHost(nc, "teller-a", RESUME_MODEL, storyteller(usage_seen), accept=True),
            ScriptedHost(nc, "teller-b", RESUME_MODEL, storyteller(usage_seen), accept=True),
            httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as http,
        ):
            await wait_listed(http, RESUME_MODEL, hosts=2)
            ready = [asyncio.Event() for _ in streams]
            tasks = [
                asyncio.create_task(tell(http, told, event, wanted=4))
                for told, event in zip(streams, ready, strict=True)
            ]
            tasks += [asyncio.create_task(tell(http, t, asyncio.Event(), 0)) for t in whole]
            async with asyncio.timeout(30):
                await asyncio.gather(*(event.wait() for event in ready))
            killed_at = time.monotonic()
            stack.kill("racer")
            async with asyncio.timeout(60):
                await asyncio.gather(*tasks)
    finally:
        await nc.close()
        assert "racer" in stack.restart_crashed()
    gaps = [
        max(
            (later - earlier for (earlier, _), (later, _) in pairwise(told.pieces)),
            default=0.0,
        )
        for told in streams
    ]
    # From the kill to each stream's next piece (a stream on the live racer: a moment).
    next_piece_s = [
        next((at - killed_at for at, _ in told.pieces if at > killed_at), 0.0) for told in streams
    ]
    for told in [*streams, *whole]:
        assert not told.error, told
        assert told.text == STORY, told
        assert told.finish_reason == "stop", told
    assert max(gaps) < stall_limit_s, gaps

    rows = await settlement_rows(stack, [t.request_id for t in [*streams, *whole]])
    audit = await audit_settlements(stack)
    resumed = {r["request_id"] for r in rows if r["task_id"].endswith(RESUMED_TASK_SUFFIX)}
    print(
        f"\nresumed {len(resumed)} of {len(streams) + len(whole)} requests "
        f"({sum(t.request_id in resumed for t in whole)} of {len(whole)} non-streaming); "
        "next piece after "
        f"the kill {sorted(round(s, 2) for s in next_piece_s)} s; longest pause per stream "
        f"{sorted(round(g, 2) for g in gaps)} s; settlements={audit}"
    )
    assert resumed, "no request was on the killed racer"
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0
    for told in [*streams, *whole]:
        mine = [r for r in rows if r["request_id"] == told.request_id]
        won = [r for r in mine if r["outcome"] == "won"]
        # The prompt charged once; one win per task: the dead race's and the resumed one's.
        assert sum(1 for r in won if r["input_tokens"] > 0) == 1, mine
        assert len(won) == len({r["task_id"] for r in won}) == len({r["task_id"] for r in mine})
        if told.request_id in resumed:
            assert len(won) == 2, mine
            dead = next(r for r in won if not r["task_id"].endswith(RESUMED_TASK_SUFFIX))
            # Paid for what the client received from it: some, never more than the story.
            assert 0 < dead["output_tokens"] < len(STORY.split(" ")), dead
    verified = await asyncio.to_thread(
        ledger_cli,
        stack,
        "verify",
        "--nats-url",
        stack.nats_url or "",
        "--seed",
        stack.control_seed or "",
        "--key-file",
        str(stack.ledger_key_file.with_suffix(".pub")),
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert await wait_healthy(stack) >= 0


@dataclass
class Arrivals:
    """Tasks that reached the hosts sharing it; `enough` is set at `wanted`."""

    wanted: int
    count: int = 0
    enough: asyncio.Event = field(default_factory=asyncio.Event)

    def arrived(self) -> None:
        self.count += 1
        if self.count >= self.wanted:
            self.enough.set()


def slow_starter(first_token_s: float, arrivals: Arrivals) -> Script:
    """Tells STORY quickly after `first_token_s` of silence (a real engine's prefill)."""

    async def script(task: HostTask, reply: Reply) -> None:
        arrivals.arrived()
        await asyncio.sleep(first_token_s)
        words = STORY.split(" ")
        for index, word in enumerate(words):
            await reply(HostChunk(token=HostToken(text=word if index == 0 else " " + word)))
            await asyncio.sleep(0.01)
        usage = Usage(input_tokens=40, output_tokens=len(words))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop", usage=usage)))

    return script


async def busiest_racer(stack: Stack, nc: Client, model: str) -> str:
    """The racer (its child's name) running most of `model`'s races, from their records."""
    races = await nc.jetstream().key_value(subjects.RACES_BUCKET)
    running: Counter[str] = Counter()
    for key in await races.keys():
        entry = await races.get(key)
        record = RaceRecord.FromString(entry.value or b"")
        if record.assignment.request.model == model:
            running[record.racer_instance_id] += 1
    names = {}
    for name in ("racer", "racer-2"):
        process = stack.child(name).process
        assert process is not None
        names[f"-{process.pid}-"] = name
    busiest = max(running, key=lambda racer: running[racer])
    return next(name for mark, name in names.items() if mark in busiest)


@pytest.mark.timeout(180)
async def test_a_racer_killed_before_the_first_token_runs_the_race_again(
    two_racers: Stack,
) -> None:
    """kill -9 of one of two racers while its races wait for their hosts' first token: the
    client has received nothing, so the ingress, finding the race's racer in its record and
    seeing it stop beating, asks the other racer to run the race again. Every answer is the
    host's exact text with no error (not a 504 at the ingress's first-token limit); the dead
    race's attempts are settled, none of them won, and each prompt is charged once."""
    stack = two_racers
    await wait_healthy(stack)
    assert stack.nats_url is not None
    model = f"slow-start-{uuid.uuid4().hex[:6]}"
    nc = await bus.connect(
        stack.nats_url, "llooma-tests-restart", nkey_seed_file=stack.control_seed
    )
    told = [Told(stream=index % 2 == 0) for index in range(6)]
    arrivals = Arrivals(wanted=len(told))
    hosts = [
        ScriptedHost(nc, f"slow-{name}-{model}", model, slow_starter(2.5, arrivals), accept=True)
        for name in ("a", "b")
    ]
    try:
        async with (
            hosts[0],
            hosts[1],
            httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as http,
        ):
            await wait_listed(http, model, hosts=2)
            tasks = [
                asyncio.create_task(tell(http, one, asyncio.Event(), 0, model=model))
                for one in told
            ]
            async with asyncio.timeout(20):
                await arrivals.enough.wait()
            victim = await busiest_racer(stack, nc, model)
            stack.kill(victim)
            async with asyncio.timeout(60):
                await asyncio.gather(*tasks)
    finally:
        await nc.close()
        stack.restart_crashed()
    for one in told:
        assert not one.error, one
        assert one.text == STORY, one
        assert one.finish_reason == "stop", one
    rows = await settlement_rows(stack, [one.request_id for one in told])
    audit = await audit_settlements(stack)
    resumed = {r["request_id"] for r in rows if r["task_id"].endswith(RESUMED_TASK_SUFFIX)}
    print(f"\nrun again: {len(resumed)} of {len(told)} requests; settlements={audit}")
    assert resumed, "no request was on the killed racer"
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0
    for one in told:
        mine = [r for r in rows if r["request_id"] == one.request_id]
        won = [r for r in mine if r["outcome"] == "won"]
        assert len(won) == 1, mine
        assert won[0]["input_tokens"] > 0, mine
        if one.request_id in resumed:
            assert won[0]["task_id"].endswith(RESUMED_TASK_SUFFIX), mine
            assert any(not r["task_id"].endswith(RESUMED_TASK_SUFFIX) for r in mine), mine


async def settlement_rows(
    stack: Stack, request_ids: list[str], timeout_s: float = 60.0
) -> list[asyncpg.Record]:
    """The requests' settlements in Postgres, once every one of them has a won attempt and
    nothing more arrived for a second."""
    assert stack.database_url is not None
    conn = await asyncpg.connect(stack.database_url)
    query = (
        "SELECT attempt_id, request_id, task_id, outcome, input_tokens, output_tokens "
        "FROM task_settlements WHERE request_id = ANY($1::text[])"
    )
    try:
        deadline = time.monotonic() + timeout_s
        seen = -1
        while True:
            rows = list(await conn.fetch(query, request_ids))
            settled = {r["request_id"] for r in rows if r["outcome"] == "won"}
            if (settled >= set(request_ids) and len(rows) == seen) or time.monotonic() > deadline:
                return rows
            seen = len(rows)
            await asyncio.sleep(1.0)
    finally:
        await conn.close()


SPLIT_THREE = (
    "I am writing a guide for new volunteers at our community garden this season.\n"
    "1. Explain how to prepare a raised bed in early spring.\n"
    "2. Describe a watering routine for hot summer weeks.\n"
    "3. List the tools every volunteer should bring.\n"
)
PART_LABELS = ("1.", "2.", "3.")
ASKED_PART = re.compile(r"Answer only part (\S+)")


def part_story(label: str) -> str:
    return f"({label}) {STORY}"


def part_teller(usage_seen: list[int]) -> Script:
    """Tells one part of a split request (`part_story` of its label) a word every 0.15 s;
    asked to continue, tells the rest of that part from the prefix it was given."""

    async def script(task: HostTask, reply: Reply) -> None:
        content = task.messages[-1].content
        prefix = extract_prefix(content) or ""
        if prefix:
            label = prefix[1 : prefix.index(")")]
        else:
            asked = ASKED_PART.search(content)
            assert asked is not None, content
            label = asked.group(1)
        whole = part_story(label)
        assert whole.startswith(prefix), prefix
        words = whole[len(prefix) :].split(" ")
        pause_s = 0.02 if prefix else 0.15
        for index, word in enumerate(words):
            await reply(HostChunk(token=HostToken(text=word if index == 0 else " " + word)))
            await asyncio.sleep(pause_s)
        usage = Usage(input_tokens=40, output_tokens=len(words))
        usage_seen.append(len(words))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop", usage=usage)))

    return script


async def tell_split(
    http: httpx.AsyncClient, told: Told, enough: asyncio.Event, prompt: str = SPLIT_THREE
) -> None:
    body = {
        "model": RESUME_MODEL,
        "stream": True,
        "max_tokens": 600,
        "messages": [{"role": "user", "content": f"{prompt}({uuid.uuid4().hex})"}],
    }
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as reply:
        told.request_id = reply.headers.get("x-llooma-request-id", "")
        assert reply.headers.get("x-llooma-path") == "split", reply.headers
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = orjson.loads(line[6:])
            if "error" in event:
                told.error = str(event["error"])
                return
            if not event["choices"]:
                continue
            choice = event["choices"][0]
            piece = choice["delta"].get("content") or ""
            if piece:
                told.pieces.append((time.monotonic(), piece))
                if len(told.pieces) == 4:
                    enough.set()
            told.finish_reason = choice.get("finish_reason") or told.finish_reason
    told.text = "".join(piece for _, piece in told.pieces)


@pytest.mark.timeout(180)
async def test_a_killed_racers_split_nodes_are_finished_on_the_other_racer(
    two_racers: Stack,
) -> None:
    """kill -9 of one of two racers while it runs node races of split requests (three
    independent parts each, the first streaming to its client, the others held by the
    aggregator): the aggregator sees the racer stop beating and asks the other racer to finish
    each of its nodes from what it received. Every answer is the three parts' exact text in
    order; every node race is settled exactly once (a won attempt per task: the dead race's,
    by the racer that took it over, and the resumed one's), each node's prompt is charged once,
    and the ledger verifies."""
    stack = two_racers
    await wait_healthy(stack)
    assert stack.nats_url is not None
    stall_limit_s = 1.5 + 3.0 + 5.0
    usage_seen: list[int] = []
    nc = await bus.connect(
        stack.nats_url, "llooma-tests-split-resume", nkey_seed_file=stack.control_seed
    )
    told = [Told(stream=True) for _ in range(4)]
    try:
        async with (
            ScriptedHost(nc, "parts-a", RESUME_MODEL, part_teller(usage_seen), accept=True),
            ScriptedHost(nc, "parts-b", RESUME_MODEL, part_teller(usage_seen), accept=True),
            ScriptedHost(nc, "parts-c", RESUME_MODEL, part_teller(usage_seen), accept=True),
            httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as http,
        ):
            await wait_listed(http, RESUME_MODEL, hosts=3)
            ready = [asyncio.Event() for _ in told]
            tasks = [
                asyncio.create_task(tell_split(http, t, event))
                for t, event in zip(told, ready, strict=True)
            ]
            async with asyncio.timeout(30):
                await asyncio.gather(*(event.wait() for event in ready))
            stack.kill("racer")
            async with asyncio.timeout(90):
                await asyncio.gather(*tasks)
    finally:
        await nc.close()
        assert "racer" in stack.restart_crashed()
    expected = "\n\n".join(f"{label} {part_story(label)}" for label in PART_LABELS)
    gaps = [
        max((later - earlier for (earlier, _), (later, _) in pairwise(t.pieces)), default=0.0)
        for t in told
    ]
    for t in told:
        assert not t.error, t
        assert t.text == expected, t
        assert t.finish_reason == "stop", t
    assert max(gaps) < stall_limit_s, gaps

    rows = await settlement_rows(stack, [t.request_id for t in told])
    audit = await audit_settlements(stack)
    resumed_tasks = {r["task_id"] for r in rows if r["task_id"].endswith(RESUMED_TASK_SUFFIX)}
    print(
        f"\nresumed {len(resumed_tasks)} of {len(told) * len(PART_LABELS)} node races; "
        f"longest pause per stream {sorted(round(g, 2) for g in gaps)} s; settlements={audit}"
    )
    assert resumed_tasks, "no node race was on the killed racer"
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0
    for t in told:
        mine = [r for r in rows if r["request_id"] == t.request_id]
        won = [r for r in mine if r["outcome"] == "won"]
        # One win per task (each node's race, and each resumed one's); each node's prompt
        # charged once.
        assert len(won) == len({r["task_id"] for r in won}) == len({r["task_id"] for r in mine})
        assert sum(1 for r in won if r["input_tokens"] > 0) == len(PART_LABELS), mine
        for task_id in {r["task_id"] for r in mine} & resumed_tasks:
            dead_id = task_id.removesuffix(RESUMED_TASK_SUFFIX)
            dead = [r for r in won if r["task_id"] == dead_id]
            # The dead node race is settled too, for at most its part's words.
            assert len(dead) == 1, mine
            assert dead[0]["output_tokens"] <= len(part_story("1.").split(" ")), dead
    verified = await asyncio.to_thread(
        ledger_cli,
        stack,
        "verify",
        "--nats-url",
        stack.nats_url or "",
        "--seed",
        stack.control_seed or "",
        "--key-file",
        str(stack.ledger_key_file.with_suffix(".pub")),
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert await wait_healthy(stack) >= 0


def split_answer() -> str:
    """What a client of `tell_split` reads: the three parts under their labels."""
    return "\n\n".join(f"{label} {part_story(label)}" for label in PART_LABELS)


def split_teller(usage_seen: list[int]) -> Script:
    """`part_teller` for the node races; asked to continue the whole answer (a racer finishing
    a split request whose aggregator died: the quoted prefix is the merged answer, which
    starts with a label, not with a part's "("), tells the rest of `split_answer`."""
    parts = part_teller(usage_seen)

    async def script(task: HostTask, reply: Reply) -> None:
        prefix = extract_prefix(task.messages[-1].content)
        if prefix is None or prefix.startswith("("):
            await parts(task, reply)
            return
        whole = split_answer()
        assert whole.startswith(prefix), prefix
        words = whole[len(prefix) :].split(" ")
        for index, word in enumerate(words):
            await reply(HostChunk(token=HostToken(text=word if index == 0 else " " + word)))
            await asyncio.sleep(0.02)
        usage = Usage(input_tokens=40, output_tokens=len(words))
        usage_seen.append(len(words))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop", usage=usage)))

    return script


@pytest.fixture(scope="module")
def two_aggregators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(tmp_path_factory.mktemp("aggregators"), replicas={"aggregator": 2})


@pytest.mark.timeout(180)
async def test_a_killed_aggregators_split_answers_are_finished_by_a_racer(
    two_aggregators: Stack,
) -> None:
    """kill -9 of the one of two aggregators holding the most of 4 streaming split requests
    (three parts each, the first streaming to its client): the ingress sees it stop beating,
    stops its node races and asks a racer to finish each answer from what the client received
    under the whole request's assignment, which the aggregator recorded. Every answer is the
    three parts' exact text in order, with no error; each attempt is settled exactly once
    (every task won at most once, each node's prompt charged once, the resumed race charged
    for its output only) and the ledger verifies."""
    stack = two_aggregators
    await wait_healthy(stack)
    assert stack.nats_url is not None
    stall_limit_s = 1.5 + 3.0 + 5.0
    usage_seen: list[int] = []
    nc = await bus.connect(
        stack.nats_url, "llooma-tests-aggregator-resume", nkey_seed_file=stack.control_seed
    )
    # Which aggregator holds each request: its instance id (`<service>-<pid>-<hex>`) is in the
    # subjects its node races report on.
    holders: dict[str, int] = {}

    async def heard(msg: Msg) -> None:
        request_id, _, _ = subjects.aggregation_node_ids(msg.subject)
        instance = msg.subject.split(".")[3]
        holders[request_id] = int(instance.split("-")[1])

    watch = await nc.subscribe(f"{subjects.PREFIX}.agg.>", cb=heard)
    told = [Told(stream=True) for _ in range(4)]
    killed = ""
    try:
        async with (
            ScriptedHost(nc, "whole-a", RESUME_MODEL, split_teller(usage_seen), accept=True),
            ScriptedHost(nc, "whole-b", RESUME_MODEL, split_teller(usage_seen), accept=True),
            ScriptedHost(nc, "whole-c", RESUME_MODEL, split_teller(usage_seen), accept=True),
            httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as http,
        ):
            await wait_listed(http, RESUME_MODEL, hosts=3)
            ready = [asyncio.Event() for _ in told]
            tasks = [
                asyncio.create_task(tell_split(http, t, event))
                for t, event in zip(told, ready, strict=True)
            ]
            async with asyncio.timeout(30):
                await asyncio.gather(*(event.wait() for event in ready))
            await watch.unsubscribe()
            by_pid = Counter(holders[t.request_id] for t in told)
            pid, _ = by_pid.most_common(1)[0]
            killed = next(
                c.name for c in stack.children if c.process is not None and c.process.pid == pid
            )
            on_killed = {t.request_id for t in told if holders[t.request_id] == pid}
            stack.kill(killed)
            async with asyncio.timeout(90):
                await asyncio.gather(*tasks)
    finally:
        await nc.close()
        if killed:
            assert killed in stack.restart_crashed()
    expected = split_answer()
    gaps = [
        max((later - earlier for (earlier, _), (later, _) in pairwise(t.pieces)), default=0.0)
        for t in told
    ]
    for t in told:
        assert not t.error, t
        assert t.text == expected, t
        assert t.finish_reason == "stop", t
    assert max(gaps) < stall_limit_s, gaps

    rows = await settlement_rows(stack, [t.request_id for t in told])
    audit = await audit_settlements(stack)
    resumed = {r["request_id"] for r in rows if r["task_id"].endswith(RESUMED_TASK_SUFFIX)}
    print(
        f"\nkilled {killed} holding {len(on_killed)} of {len(told)} split requests; "
        f"{len(resumed)} finished by a racer; longest pause per stream "
        f"{sorted(round(g, 2) for g in gaps)} s; settlements={audit}"
    )
    # Exactly the killed aggregator's requests were resumed.
    assert resumed == on_killed
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0
    for t in told:
        mine = [r for r in rows if r["request_id"] == t.request_id]
        won = [r for r in mine if r["outcome"] == "won"]
        assert len(won) == len({r["task_id"] for r in won}), mine
        nodes = [r for r in won if not r["task_id"].endswith(RESUMED_TASK_SUFFIX)]
        # Each node's prompt charged once (its race, stopped or not, settled by its racer).
        assert all(r["input_tokens"] > 0 for r in nodes), mine
        if t.request_id in resumed:
            finisher = [r for r in won if r["task_id"].endswith(RESUMED_TASK_SUFFIX)]
            # The whole request's prompt is charged nowhere else: its finisher is charged
            # for its output only.
            assert len(finisher) == 1, mine
            assert finisher[0]["input_tokens"] == 0 < finisher[0]["output_tokens"], mine
            # Its node races were stopped when the aggregator was found dead, not run out.
            words = len(part_story("1.").split(" "))
            assert all(r["output_tokens"] < words for r in nodes), mine
        else:
            assert len(nodes) == len(PART_LABELS), mine
    verified = await asyncio.to_thread(
        ledger_cli,
        stack,
        "verify",
        "--nats-url",
        stack.nats_url or "",
        "--seed",
        stack.control_seed or "",
        "--key-file",
        str(stack.ledger_key_file.with_suffix(".pub")),
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert await wait_healthy(stack) >= 0


# The third part uses the first two: the DAG runner releases it only once they are done.
SPLIT_DEPENDENT = (
    "I am writing a guide for new volunteers at our community garden this season.\n"
    "1. Explain how to prepare a raised bed in early spring.\n"
    "2. Describe a watering routine for hot summer weeks.\n"
    "3. Using the results, list the tools every volunteer should bring.\n"
)


@pytest.fixture(scope="module")
def two_dispatchers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_fixture(tmp_path_factory.mktemp("dispatchers"), replicas={"dispatcher": 2})


@pytest.mark.timeout(180)
async def test_a_killed_dispatchers_dags_are_run_on_by_the_other_dispatcher(
    two_dispatchers: Stack,
) -> None:
    """kill -9 of the one of two dispatchers running the DAGs of the most of 4 streaming split
    requests, while their first two parts stream and the third (which uses them) is not yet
    released: each aggregator sees the dispatcher stop beating and has the other one run the
    rest of the DAG. Every answer is the three parts' exact text in order, with no error;
    every node race is settled exactly once, each node's prompt charged once, and the ledger
    verifies."""
    stack = two_dispatchers
    await wait_healthy(stack)
    assert stack.nats_url is not None
    stall_limit_s = 1.5 + 3.0 + 5.0
    usage_seen: list[int] = []
    nc = await bus.connect(
        stack.nats_url, "llooma-tests-dag-resume", nkey_seed_file=stack.control_seed
    )
    # Which dispatcher runs each DAG: its instance id (`<service>-<pid>-<hex>`) is in the
    # subject the aggregator reports finished parts on.
    holders: dict[str, int] = {}

    async def heard(msg: Msg) -> None:
        start = AggregationStart.FromString(msg.data)
        dispatcher = subjects.node_done_dispatcher(start.node_done_subject)
        holders[start.request_id] = int(dispatcher.split("-")[1])

    watch = await nc.subscribe(subjects.AGGREGATE_START, cb=heard)
    # The aggregators' requests to run a DAG on, and when they were sent.
    dag_resumes: dict[str, float] = {}

    async def dag_resumed(msg: Msg) -> None:
        dag_resumes[DagResume.FromString(msg.data).request.request_id] = time.monotonic()

    await nc.subscribe(subjects.DAG_RESUME, cb=dag_resumed)
    told = [Told(stream=True) for _ in range(4)]
    killed = ""
    killed_at = 0.0
    try:
        async with (
            ScriptedHost(nc, "dag-a", RESUME_MODEL, part_teller(usage_seen), accept=True),
            ScriptedHost(nc, "dag-b", RESUME_MODEL, part_teller(usage_seen), accept=True),
            ScriptedHost(nc, "dag-c", RESUME_MODEL, part_teller(usage_seen), accept=True),
            httpx.AsyncClient(base_url=stack.base_url, timeout=60.0) as http,
        ):
            await wait_listed(http, RESUME_MODEL, hosts=3)
            ready = [asyncio.Event() for _ in told]
            tasks = [
                asyncio.create_task(tell_split(http, t, event, SPLIT_DEPENDENT))
                for t, event in zip(told, ready, strict=True)
            ]
            async with asyncio.timeout(30):
                await asyncio.gather(*(event.wait() for event in ready))
            await watch.unsubscribe()
            pid, _ = Counter(holders[t.request_id] for t in told).most_common(1)[0]
            killed = next(
                c.name for c in stack.children if c.process is not None and c.process.pid == pid
            )
            on_killed = {t.request_id for t in told if holders[t.request_id] == pid}
            killed_at = time.monotonic()
            stack.kill(killed)
            async with asyncio.timeout(90):
                await asyncio.gather(*tasks)
    finally:
        await nc.close()
        if killed:
            assert killed in stack.restart_crashed()
    # Exactly the killed dispatcher's DAGs were run on by the other.
    assert set(dag_resumes) == on_killed
    expected = split_answer()
    gaps = [
        max((later - earlier for (earlier, _), (later, _) in pairwise(t.pieces)), default=0.0)
        for t in told
    ]
    for t in told:
        assert not t.error, t
        assert t.text == expected, t
        assert t.finish_reason == "stop", t
    assert max(gaps) < stall_limit_s, gaps

    rows = await settlement_rows(stack, [t.request_id for t in told])
    audit = await audit_settlements(stack)
    print(
        f"\nkilled {killed} running the DAGs of {len(on_killed)} of {len(told)} split "
        "requests; DAG resumed after "
        f"{sorted(round(at - killed_at, 2) for at in dag_resumes.values())} s; "
        f"longest pause per stream {sorted(round(g, 2) for g in gaps)} s; "
        f"settlements={audit}"
    )
    assert on_killed
    assert audit["lost"] == 0
    assert audit["paid_twice"] == 0
    for t in told:
        mine = [r for r in rows if r["request_id"] == t.request_id]
        won = [r for r in mine if r["outcome"] == "won"]
        # One race per part, each won once, each part's prompt charged once.
        assert len(won) == len({r["task_id"] for r in mine}) == len(PART_LABELS), mine
        assert all(r["input_tokens"] > 0 for r in won), mine
    verified = await asyncio.to_thread(
        ledger_cli,
        stack,
        "verify",
        "--nats-url",
        stack.nats_url or "",
        "--seed",
        stack.control_seed or "",
        "--key-file",
        str(stack.ledger_key_file.with_suffix(".pub")),
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert await wait_healthy(stack) >= 0
