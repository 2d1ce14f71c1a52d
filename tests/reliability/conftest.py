"""Fault fixtures: each test module that kills things gets a stack of its own (its own
nats-server and Postgres), never the shared session stack; and a load driver that records how
every request ended."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import orjson

from llooma import bus, subjects
from llooma.processes import free_port
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack
from llooma.v1.settlement_pb2 import TaskSettlement

AUTH = {"Authorization": f"Bearer {DEV_API_KEY}"}
# Short fallback and stall limits keep a request whose racer died bounded: the ingress gives
# up on it after deadline + fallback + 10 s (first event) or stall + 5 s (between events).
FAULT_ENV = {
    "LLOOMA_FALLBACK_FIRST_TOKEN_MS": "3000",
    "LLOOMA_STALL_DEADLINE_MS": "1500",
    "LLOOMA_DUEL_FRACTION": "0",
    "LLOOMA_SILENCE_PROBE_FRACTION": "0",
}
# No request may take longer than this, whatever was killed (the ingress's own limit is 14 s).
CLIENT_DEADLINE_S = 25.0
SPLIT_PROMPT = (
    "Answer each of these three questions in two sentences for a newcomer to the field:\n"
    "1. What is a message queue and why would a service use one?\n"
    "2. What does idempotent mean for a network API?\n"
    "3. Why do databases write a log before changing their tables?"
)


def start_fault_stack(root: Path, replicas: dict[str, int] | None = None) -> Stack:
    stack = Stack(root=root, http_port=free_port(), extra_env=FAULT_ENV, replicas=replicas or {})
    stack.start()
    return stack


def stack_fixture(root: Path, replicas: dict[str, int] | None = None) -> Iterator[Stack]:
    stack = start_fault_stack(root, replicas)
    try:
        yield stack
    finally:
        stack.stop()


@dataclass
class Result:
    started_at: float
    ended_at: float = 0.0
    # completed ([DONE]), error_event (an error after 200), http_error (4xx/5xx before any
    # stream), refused (no ingress listening: never accepted), dropped (the connection broke
    # mid-response: its ingress died), hung (past CLIENT_DEADLINE_S)
    end: str = ""
    status: int = 0
    request_id: str = ""
    # The Retry-After of a refused request (4xx/5xx before any stream).
    retry_after: str = ""
    # Asked with the prompt the planner splits into parts.
    split: bool = False


@dataclass
class Load:
    """Keeps `concurrency` streaming requests in flight until stopped."""

    base_url: str
    concurrency: int = 6
    results: list[Result] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    def in_flight(self) -> int:
        return sum(1 for r in self.results if not r.end)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]

    async def stop(self) -> list[Result]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.results

    async def _worker(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=CLIENT_DEADLINE_S) as http:
            while not self._stop.is_set():
                result = Result(time.monotonic())
                self.results.append(result)
                split = result.split = self.rng.random() < 0.25
                content = SPLIT_PROMPT if split else f"Say something about {self.rng.random()}."
                body = {
                    "model": "llooma",
                    "stream": True,
                    "max_tokens": 64 if split else 24,
                    "messages": [{"role": "user", "content": content}],
                }
                try:
                    async with asyncio.timeout(CLIENT_DEADLINE_S):
                        result.end = await one_request(http, body, result)
                except TimeoutError:
                    result.end = "hung"
                result.ended_at = time.monotonic()
                if result.end in ("refused", "http_error"):
                    await asyncio.sleep(0.2)


async def one_request(http: httpx.AsyncClient, body: dict[str, object], result: Result) -> str:
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as reply:
            result.status = reply.status_code
            result.request_id = reply.headers.get("x-llooma-request-id", "")
            if reply.status_code != 200:
                result.retry_after = reply.headers.get("retry-after", "")
                await reply.aread()
                return "http_error"
            async for line in reply.aiter_lines():
                if line == "data: [DONE]":
                    return "completed"
                if line.startswith("data: ") and "error" in orjson.loads(line[6:]):
                    return "error_event"
            return "dropped"  # the stream closed with neither [DONE] nor an error event
    except httpx.ConnectError:
        return "refused"
    except (httpx.RemoteProtocolError, httpx.ReadError):
        return "dropped"


def tally(results: list[Result]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.end or "unfinished"] = counts.get(r.end or "unfinished", 0) + 1
    return counts


async def wait_healthy(stack: Stack, timeout_s: float = 60.0) -> float:
    """Seconds until /healthz is 200 and a request completes again."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=5.0) as http:
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(httpx.HTTPError):
                health = await http.get("/healthz")
                if health.status_code == 200:
                    body = {
                        "model": "llooma",
                        "max_tokens": 4,
                        "messages": [{"role": "user", "content": "ping"}],
                    }
                    reply = await http.post("/v1/chat/completions", json=body, headers=AUTH)
                    if reply.status_code == 200:
                        return time.monotonic() - started
            await asyncio.sleep(0.2)
    raise TimeoutError(f"stack not healthy after {timeout_s} s")


async def published_settlements(stack: Stack) -> list[TaskSettlement]:
    """Every settlement JetStream acknowledged to the racers, read back from the stream."""
    assert stack.nats_url is not None
    nc = await bus.connect(stack.nats_url, "llooma-tests-audit", nkey_seed_file=stack.control_seed)
    try:
        js = nc.jetstream()
        found: dict[int, TaskSettlement] = {}
        sub = await js.subscribe(subjects.SETTLEMENT_TASK, ordered_consumer=True)
        # Only the task settlements: the stream also holds duel results and delivery reports.
        info = await js.stream_info(
            subjects.SETTLEMENT_STREAM, subjects_filter=subjects.SETTLEMENT_TASK
        )
        expected = (info.state.subjects or {}).get(subjects.SETTLEMENT_TASK, 0)
        # By stream sequence: an ordered consumer that resets may deliver one again.
        while len(found) < expected:
            msg = await sub.next_msg(timeout=5)
            found[msg.metadata.sequence.stream] = TaskSettlement.FromString(msg.data)
        await sub.unsubscribe()
        return list(found.values())
    finally:
        await nc.close()


async def ledger_rows(stack: Stack) -> list[asyncpg.Record]:
    assert stack.database_url is not None
    conn = await asyncpg.connect(stack.database_url)
    try:
        return list(await conn.fetch("SELECT attempt_id, task_id, outcome FROM task_settlements"))
    finally:
        await conn.close()


async def audit_settlements(stack: Stack, timeout_s: float = 60.0) -> dict[str, int]:
    """Waits until accounting has written every published settlement (a killed accounting's
    unacked batch comes back after its consumer's 30 s ack_wait); returns the figures.
    Lost = published but not in Postgres; paid twice = an attempt twice, or two wins a task."""
    published = await published_settlements(stack)
    wanted = {s.attempt_id for s in published}
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await ledger_rows(stack)
        stored = [r["attempt_id"] for r in rows]
        lost = wanted - set(stored)
        if not lost or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    wins: dict[str, int] = {}
    for row in rows:
        if row["outcome"] == "won":
            wins[row["task_id"]] = wins.get(row["task_id"], 0) + 1
    return {
        "published": len(wanted),
        "stored": len(stored),
        "lost": len(lost),
        "paid_twice": (len(stored) - len(set(stored))) + sum(1 for n in wins.values() if n > 1),
    }
