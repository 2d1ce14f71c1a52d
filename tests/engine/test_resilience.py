"""A real engine's hosts under the race's churn, under load, and when an engine or a host worker
dies: cancelled races leave no connections behind, the heartbeat reads the engine's own load, a
stopped engine takes its host out, and a stream whose host or engine is killed still completes
without any of the continuation's frame reaching the client.

`LLOOMA_ENGINE_RACES` (default 500; the issue's figure is 2,000) and `LLOOMA_ENGINE_KILLS`
(default 5 of each kind; the issue's figure is 10) scale the two long tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from typing import Any

import httpx
import openai
import orjson
import psutil
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from openai.types.chat import ChatCompletionMessageParam

from llooma import subjects
from llooma.bench.sse_client import SseClient
from llooma.settings import DEV_API_KEY
from llooma.v1.common_pb2 import ChatMessage, GenerationParams
from llooma.v1.host_pb2 import CancelTask, HostChunk, HostHeartbeat, HostTask
from llooma.v1.race_pb2 import AttemptRole, RaceEvent
from llooma.v1.settlement_pb2 import AttemptOutcome
from tests.engine.conftest import (
    CAPACITY,
    HOSTS,
    KEYS,
    MODEL,
    ONLY,
    EngineRig,
    listed_models,
    wait_for,
)

pytestmark = pytest.mark.engine

RACES = int(os.environ.get("LLOOMA_ENGINE_RACES", "500"))
KILLS = int(os.environ.get("LLOOMA_ENGINE_KILLS", "5"))
# The continuation prompt's frame (llooma.continuation), as a real model was seen to echo it.
FRAME = (
    "<<<",
    ">>>",
    "Your answer to the conversation above was cut off",
    "This is the answer so far",
    "Continue the answer exactly where it stops",
    "Output only the continuation",
)
STORY: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me a long story about a lighthouse keeper and his dog."}
]


def engine_connections(pid: int, port: int) -> int:
    """Established TCP connections from a process to the engine's port."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def host_first_token_s(nc: Client, host: str) -> float:
    """A task sent straight to a host's capability subject: seconds to its first token."""
    inbox = nc.new_inbox()
    first: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def on_chunk(msg: Msg) -> None:
        chunk = HostChunk.FromString(msg.data)
        if first.done():
            return
        if chunk.HasField("token"):
            first.set_result(time.monotonic())
        elif chunk.HasField("failed") or chunk.HasField("finished"):
            first.set_exception(AssertionError(f"{host} answered {chunk} before any token"))

    subscription = await nc.subscribe(inbox, cb=on_chunk)
    task = HostTask(
        attempt_id=uuid.uuid4().hex,
        model=MODEL,
        messages=[ChatMessage(role="user", content="Say hello.")],
        params=GenerationParams(max_tokens=4),
    )
    started = time.monotonic()
    await nc.publish(subjects.host_task(MODEL, host), task.SerializeToString(), reply=inbox)
    try:
        return (await asyncio.wait_for(first, 10.0)) - started
    finally:
        await subscription.unsubscribe()


@pytest.mark.timeout(1800)
async def test_many_races_at_width_2_leave_the_hosts_answering_within_1s(
    rig: EngineRig, rig_nc: Client
) -> None:
    url = httpx.URL(rig.base_url)
    http = SseClient(url.host, url.port or 80, DEV_API_KEY)
    body = orjson.dumps(
        {
            "model": MODEL,
            "stream": True,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Name a colour."}],
        }
    )
    headers = {"x-llooma-race-width": "2"}
    unanswered: list[int] = []
    remaining = iter(range(RACES))

    async def racer() -> None:
        for _ in remaining:
            timing = await http.timed_stream("/v1/chat/completions", body, headers)
            if timing.status != 200 or timing.first_token is None:
                unanswered.append(timing.status)

    # Two races in flight: four engine requests, each engine's two slots busy.
    await asyncio.gather(racer(), racer())
    await http.close()
    assert not unanswered, f"{len(unanswered)} of {RACES} races unanswered: {unanswered[:10]}"
    for key in KEYS:
        # Two models on one upstream, CAPACITY each, plus the heartbeat's metrics scrape.
        held = engine_connections(rig.host_pid(key), rig.engines[key].port)
        assert held <= 2 * CAPACITY + 2, f"{HOSTS[key]} holds {held} connections to its engine"
        assert await host_first_token_s(rig_nc, HOSTS[key]) < 1.0


async def test_load_rises_in_the_heartbeat_when_the_engine_is_busy(
    rig: EngineRig, rig_nc: Client
) -> None:
    kv = await rig_nc.jetstream().key_value(subjects.HOSTS_BUCKET)

    async def load() -> float:
        entry = await kv.get(HOSTS["a"])
        assert entry.value is not None
        return HostHeartbeat.FromString(entry.value).load

    # Four requests straight to engine a, past the stack: two decoding, two deferred.
    async with httpx.AsyncClient(base_url=rig.engines["a"].openai_url, timeout=60.0) as engine:
        # Streamed, so that a cancelled one ends on the engine too (at its next write).
        body: dict[str, Any] = {
            "model": "any",
            "messages": STORY,
            "max_tokens": 400,
            "stream": True,
        }
        busy = [asyncio.create_task(engine.post("/chat/completions", json=body)) for _ in range(4)]
        peak = 0.0
        try:
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and peak < 0.5:
                await asyncio.sleep(0.25)
                peak = max(peak, await load())
        finally:
            for request in busy:
                request.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
    assert peak >= 0.5


async def test_a_stopped_engine_makes_its_host_ineligible_within_2s(
    restored: EngineRig,
) -> None:
    restored.engines["b"].stop()
    try:
        gone_after = await wait_for(
            lambda: ONLY["b"] not in listed_models(restored.base_url), timeout_s=10.0
        )
    except TimeoutError:
        pytest.fail(f"{HOSTS['b']} still eligible 10 s after its engine stopped")
    assert gone_after < 2.0
    assert MODEL in listed_models(restored.base_url)


class TaskWatch:
    """Which host got which attempt of the model, and which attempts were cancelled."""

    def __init__(self) -> None:
        self.attempts: dict[str, str] = {}
        self.cancelled: set[str] = set()
        self.races: list[RaceEvent] = []
        self.failures: dict[str, str] = {}

    async def on_task(self, msg: Msg) -> None:
        self.attempts[HostTask.FromString(msg.data).attempt_id] = msg.subject.rsplit(".", 1)[1]

    async def on_cancel(self, msg: Msg) -> None:
        self.cancelled.add(CancelTask.FromString(msg.data).attempt_id)

    async def on_chunk(self, msg: Msg) -> None:
        chunk = HostChunk.FromString(msg.data)
        if chunk.HasField("failed"):
            attempt = msg.subject.rpartition(".")[2]
            self.failures[attempt] = f"{chunk.failed.code} {chunk.failed.message}"

    async def on_race(self, msg: Msg) -> None:
        self.races.append(RaceEvent.FromString(msg.data))

    def __str__(self) -> str:
        """The attempts of the races seen, as the racer reported them."""
        return "; ".join(
            f"race {race.request_id}: "
            + ", ".join(
                f"{a.host_id} {AttemptRole.Name(a.role)} {AttemptOutcome.Name(a.outcome)}"
                f" first {a.first_token_ms} ms, {a.output_tokens} tokens, accepted {a.accepted}"
                f" launched after {a.launched_after_ms} ms {self.failures.get(a.attempt_id, '')}"
                for a in race.attempts
            )
            for race in self.races
        )

    def streaming_host(self) -> str:
        live = {host for attempt, host in self.attempts.items() if attempt not in self.cancelled}
        assert len(live) == 1, f"cannot tell the streaming host: {self.attempts} {self.cancelled}"
        return live.pop()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("victim", ["host worker", "llama-server"])
async def test_a_kill_9_mid_stream_still_completes_the_answer_without_the_frame(
    restored: EngineRig, client: openai.AsyncOpenAI, rig_nc: Client, victim: str
) -> None:
    by_host = {host: key for key, host in HOSTS.items()}
    completed = 0
    attempts = 0
    while completed < KILLS:
        attempts += 1
        assert attempts <= 3 * KILLS, "the model keeps ending its answer before the kill"
        restored.restore()
        watch = TaskWatch()
        subscriptions = [
            await rig_nc.subscribe(subjects.host_task(MODEL, "*"), cb=watch.on_task),
            await rig_nc.subscribe(subjects.host_cancel("*"), cb=watch.on_cancel),
            await rig_nc.subscribe(subjects.RACE_EVENT, cb=watch.on_race),
            await rig_nc.subscribe(f"{subjects.PREFIX}.tokens.>", cb=watch.on_chunk),
        ]
        text, finish_reason, killed = "", None, ""
        try:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=STORY,
                max_tokens=120,
                stream=True,
            )
            pieces = 0
            async for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    pieces += bool(choice.delta.content)
                    finish_reason = choice.finish_reason or finish_reason
                if not killed and pieces >= 6:
                    killed = by_host[watch.streaming_host()]
                    if victim == "host worker":
                        restored.stack.kill(HOSTS[killed])
                    else:
                        restored.engines[killed].kill()
        except openai.APIError as error:
            await asyncio.sleep(1.0)  # the race event follows the client's last event
            raise AssertionError(f"kill {completed + 1} of {victim}: {error}; {watch}") from error
        finally:
            for subscription in subscriptions:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        if not killed:
            continue  # the answer ended before six pieces: nothing was killed, try again
        completed += 1
        assert finish_reason in ("stop", "length"), f"kill {completed}: ended {finish_reason}"
        leaked = [piece for piece in FRAME if piece in text]
        assert not leaked, f"kill {completed} of {victim}: the frame reached the client: {text!r}"
