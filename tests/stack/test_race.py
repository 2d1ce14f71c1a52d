"""Dispatch, race, fallback and continuation on the running stack (real NATS, real hosts)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from asyncio import FIRST_COMPLETED
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import BadRequestError, KeyNotFoundError

from llooma import subjects
from llooma.continuation import extract_prefix
from llooma.embedded import EmbeddedNats
from llooma.host.config import Generation, HostConfig, Latency, ModelConfig, Policy
from llooma.host.worker import HostWorker
from llooma.processes import die_with_parent
from llooma.service import Service
from llooma.settings import Settings
from llooma.v1.common_pb2 import ERROR_CODE_HOST_BUSY, ErrorDetail, Usage
from llooma.v1.host_pb2 import HostAccepted, HostChunk, HostFinished, HostTask, HostToken
from llooma.v1.pipeline_pb2 import ChatRequest, HostCandidate, TaskAssignment
from llooma.v1.race_pb2 import (
    ATTEMPT_ROLE_CONTINUATION,
    ATTEMPT_ROLE_FALLBACK,
    ATTEMPT_ROLE_HEDGE,
    ATTEMPT_ROLE_RACER,
)
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_LOST, ATTEMPT_OUTCOME_WON
from services.racer.main import MAX_CONCURRENT_RACES
from services.racer.race import NatsIO
from services.racer.report import settlements
from services.racer.state import Attempt, Race
from tests.conftest import AUTH, HEDGE_DELAY_MS, HEDGED_MODEL, RaceEvents
from tests.support.scripted_host import Reply, Script, ScriptedHost

TEXT = (
    "Racing two hosts turns the tail of one into the square of that tail. "
    "When a stream stalls, another model continues from the emitted prefix, "
    "and the client never sees a seam in the answer it reads."
)


def chat(model: str, content: str = "go", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def wait_listed(http: httpx.AsyncClient, model: str, hosts: int = 1) -> None:
    for _ in range(200):
        response = await http.get("/healthz")
        listed = await http.get("/v1/models", headers=AUTH)
        if response.status_code == 200 and model in [m["id"] for m in listed.json()["data"]]:
            await asyncio.sleep(0.6 if hosts > 1 else 0)  # let every host's beat land
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{model} never listed")


async def wait_for_host(nc: Client, host_id: str) -> None:
    """Until the host's own heartbeat is in the bucket (a process takes a while to start)."""
    kv = await nc.jetstream().key_value(subjects.HOSTS_BUCKET)
    for _ in range(300):
        try:
            entry = await kv.get(host_id)
            if entry.value:
                return
        except KeyNotFoundError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"{host_id} never heartbeated")


async def stream_text(
    http: httpx.AsyncClient, body: dict[str, object], headers: dict[str, str] | None = None
) -> tuple[str, str, list[dict[str, object]]]:
    """(request id, the streamed text, every event) of one streaming request."""
    body = {**body, "stream": True}
    async with http.stream(
        "POST", "/v1/chat/completions", json=body, headers={**AUTH, **(headers or {})}
    ) as response:
        assert response.status_code == 200, await response.aread()
        request_id = response.headers["x-llooma-request-id"]
        events = [
            orjson.loads(line.removeprefix("data: "))
            async for line in response.aiter_lines()
            if line.startswith("data: {")
        ]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
    return request_id, text, events


def worker(host_id: str, nats_url: str, model: ModelConfig) -> HostConfig:
    return HostConfig(name=host_id, nats_url=nats_url, models=[model])


async def test_the_faster_host_wins_and_the_loser_stops_within_50ms(
    http: httpx.AsyncClient, nc: Client, nats_url: str, race_events: RaceEvents
) -> None:
    model = f"duel-{uuid.uuid4().hex[:6]}"
    fast = HostWorker(
        worker(
            f"fast-{model}",
            nats_url,
            ModelConfig(name=model, first_token=Latency(ms=20), inter_token=Latency(ms=5)),
        ),
        nc,
    )
    slow = HostWorker(
        worker(
            f"slow-{model}",
            nats_url,
            ModelConfig(
                name=model,
                first_token=Latency(ms=60),
                inter_token=Latency(ms=1),
                generation=Generation(max_tokens=2000),
            ),
        ),
        nc,
    )
    await fast.start()
    await slow.start()
    try:
        await wait_listed(http, model, hosts=2)
        body = {**chat(model), "stream": True, "max_tokens": 20}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
            request_id = r.headers["x-llooma-request-id"]
            lines = r.aiter_lines()
            async for line in lines:
                if '"content":"' in line and '"content":""' not in line:
                    break
            first_token_at = time.monotonic()
            while slow.heartbeat().in_flight:  # noqa: ASYNC110 - polling a counter
                await asyncio.sleep(0.002)
            loser_stopped_after = time.monotonic() - first_token_at
            async for _ in lines:
                pass
        event = await race_events.wait_for(request_id)
    finally:
        await fast.drain()
        await slow.drain()
    assert event.winner_host_id == f"fast-{model}"
    outcomes = {a.host_id: a for a in event.attempts}
    assert outcomes[f"fast-{model}"].outcome == ATTEMPT_OUTCOME_WON
    assert outcomes[f"slow-{model}"].outcome == ATTEMPT_OUTCOME_LOST
    assert loser_stopped_after < 0.05
    assert outcomes[f"slow-{model}"].output_tokens < 50


async def test_a_race_whose_racer_dies_before_recording_it_is_run_by_the_other_racer(
    http: httpx.AsyncClient, nc: Client, nats_url: str, control_seed: str | None
) -> None:
    """A second racer joins the racers' queue; it takes races and dies (its connection
    closes) without recording or claiming one: JetStream hands that race to the live racer
    after the 2 s ack_wait, and the client gets its answer (services/racer/main.py)."""
    model = f"claim-{uuid.uuid4().hex[:6]}"
    host = HostWorker(
        worker(
            f"host-{model}",
            nats_url,
            ModelConfig(name=model, first_token=Latency(ms=5), inter_token=Latency(ms=1)),
        ),
        nc,
    )
    await host.start()
    dying = Service("racer", Settings(nats_url=nats_url, nats_nkey_seed_file=control_seed or ""))
    await dying.connect()
    taken: asyncio.Queue[str] = asyncio.Queue()

    async def take_and_hang(msg: Msg) -> None:
        await taken.put(TaskAssignment.FromString(msg.data).request.request_id)
        await asyncio.Event().wait()

    async def ask() -> httpx.Response:
        body = {**chat(model), "max_tokens": 8}
        return await http.post("/v1/chat/completions", json=body, headers=AUTH, timeout=30)

    try:
        await wait_listed(http, model)
        # The same consumer as the racers' (services/racer/main.py), so its config is kept.
        await dying.consume(
            subjects.PIPELINE_RACER,
            subjects.CONSUMER_RACER,
            take_and_hang,
            max_concurrency=MAX_CONCURRENT_RACES,
            claims=True,
        )
        held: asyncio.Task[httpx.Response] | None = None
        for _ in range(40):  # each goes to one of the two racers at random
            request = asyncio.create_task(ask())
            grabbed = asyncio.create_task(taken.get())
            await asyncio.wait({request, grabbed}, timeout=15, return_when=FIRST_COMPLETED)
            if grabbed.done():
                held = request
                break
            grabbed.cancel()
            assert (await request).status_code == 200
        assert held is not None, "the dying racer was never handed a race"
        await dying.nc.close()
        for task in dying._running:
            task.cancel()
        response = await asyncio.wait_for(held, 30)
    finally:
        if not dying.nc.is_closed:
            await dying.nc.close()
        await host.drain()
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] > 0


async def test_no_first_token_by_the_deadline_goes_to_the_fallback(
    http: httpx.AsyncClient, nc: Client, race_events: RaceEvents
) -> None:
    model = f"mute-{uuid.uuid4().hex[:6]}"

    async def mute(_: HostTask, reply: Reply) -> None:
        await reply(HostChunk(accepted=HostAccepted()))  # and never a token

    async def rescue(_: HostTask, reply: Reply) -> None:
        await reply(HostChunk(seq=1, token=HostToken(text="rescued")))
        finished = HostFinished(finish_reason="stop", usage=Usage(output_tokens=1))
        await reply(HostChunk(seq=2, finished=finished))

    deadline_ms = 300
    async with (
        ScriptedHost(nc, f"mute-a-{model}", model, mute, stake=100.0),
        ScriptedHost(nc, f"mute-b-{model}", model, mute, stake=100.0),
        ScriptedHost(nc, f"rescuer-{model}", model, rescue, stake=0.0, accept=True),
    ):
        await wait_listed(http, model, hosts=3)
        for _ in range(3):
            started = time.monotonic()
            response = await http.post(
                "/v1/chat/completions",
                json=chat(model),
                headers={**AUTH, "x-llooma-first-token-deadline-ms": str(deadline_ms)},
            )
            elapsed = time.monotonic() - started
            assert response.status_code == 200
            event = await race_events.wait_for(response.headers["x-llooma-request-id"])
            if event.winner_host_id != f"rescuer-{model}":
                continue  # the rescuer was drawn into the race itself (stake 0: rare)
            assert response.headers["x-llooma-path"] == "fallback"
            assert response.json()["choices"][0]["message"]["content"] == "rescued"
            assert event.first_token_deadline_hit
            roles = {a.host_id: a.role for a in event.attempts}
            assert roles[f"rescuer-{model}"] == ATTEMPT_ROLE_FALLBACK
            assert deadline_ms / 1000 <= elapsed < deadline_ms / 1000 + 0.25
            return
    raise AssertionError("the fallback never answered")


def continuer(text: str, repeat_chars: int) -> tuple[Script, list[str], list[int]]:
    """A host that continues `text` from the prefix in its prompt, re-emitting the last
    `repeat_chars` characters of it first (as models do), and refuses plain tasks; also
    returns the max_tokens each continuation was given."""
    prefixes: list[str] = []
    budgets: list[int] = []

    async def script(task: HostTask, reply: Reply) -> None:
        prefix = extract_prefix(task.messages[-1].content)
        if prefix is None:
            await reply(HostChunk(failed=ErrorDetail(code=ERROR_CODE_HOST_BUSY, message="no")))
            return
        prefixes.append(prefix)
        budgets.append(task.params.max_tokens)
        assert text.startswith(prefix)
        rest = text[max(0, len(prefix) - repeat_chars) :]
        for index, piece in enumerate(rest.split(" ")):
            await reply(HostChunk(token=HostToken(text=piece if index == 0 else " " + piece)))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop")))

    return script, prefixes, budgets


@pytest.mark.parametrize("stall_at", [3, 11, 24])
async def test_a_stalled_stream_continues_on_another_host_without_seams(
    http: httpx.AsyncClient, nc: Client, race_events: RaceEvents, stall_at: int
) -> None:
    model = f"stall-{uuid.uuid4().hex[:6]}"
    words = TEXT.split(" ")

    async def stall(_: HostTask, reply: Reply) -> None:
        for index, word in enumerate(words[:stall_at]):
            await reply(HostChunk(token=HostToken(text=word if index == 0 else " " + word)))
        # Half a word more, then silence: the safe prefix ends before it.
        await reply(HostChunk(token=HostToken(text=" " + words[stall_at][:2])))
        await asyncio.sleep(30)

    script, prefixes, budgets = continuer(TEXT, repeat_chars=12)
    async with (
        ScriptedHost(nc, f"staller-{model}", model, stall, stake=100.0, accept=True),
        # `accepted` first, as a real host sends it: a handover must wait past it for a token.
        ScriptedHost(nc, f"continuer-{model}", model, script, stake=0.0, accept=True),
    ):
        await wait_listed(http, model, hosts=2)
        request_id, text, events = await stream_text(http, chat(model, max_tokens=500))
    assert text == TEXT
    assert prefixes, "the continuation host got the prefix in its prompt"
    # max_tokens is the answer's: the heir may write only what the staller left of it.
    assert budgets == [500 - (stall_at + 1)]
    assert TEXT.startswith(prefixes[0])
    assert prefixes[0].endswith(" ")
    assert events[-1]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    event = await race_events.wait_for(request_id)
    assert event.continuations == 1
    assert any(a.role == ATTEMPT_ROLE_CONTINUATION for a in event.attempts)
    assert any(a.stalled for a in event.attempts)


async def test_kill_9_of_a_host_mid_stream_continues_elsewhere(
    http: httpx.AsyncClient,
    nc: Client,
    nats_server: EmbeddedNats | None,
    race_events: RaceEvents,
    tmp_path: Path,
) -> None:
    if nats_server is None or nats_server.credentials is None:
        pytest.skip("needs the embedded NATS server with credentials")
    model = f"victim-{uuid.uuid4().hex[:6]}"
    name = f"dying-{model}"
    config = HostConfig(
        name=name,
        nats_url=nats_server.url,
        credentials=nats_server.credentials.issue(name),
        models=[
            ModelConfig(
                name=model,
                policy=Policy(stake=100.0),
                generation=Generation(max_tokens=200),
                inter_token=Latency(ms=40),
            )
        ],
    )
    path = tmp_path / "dying.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    process = subprocess.Popen(  # noqa: ASYNC220 - a child process that lives for the test
        [sys.executable, "-m", "llooma.cli", "host", "--config", str(path)],
        env=dict(os.environ),
        preexec_fn=die_with_parent,
    )
    emitted: list[str] = []

    async def carry_on(task: HostTask, reply: Reply) -> None:
        prefix = extract_prefix(task.messages[-1].content)
        if prefix is None:
            await reply(HostChunk(failed=ErrorDetail(code=ERROR_CODE_HOST_BUSY, message="no")))
            return
        emitted.append(prefix)
        await reply(HostChunk(token=HostToken(text=" and so the answer goes on.")))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop")))

    try:
        async with ScriptedHost(nc, f"heir-{model}", model, carry_on, stake=0.0, accept=True):
            await wait_for_host(nc, name)
            await wait_listed(http, model, hosts=2)
            body = {**chat(model), "stream": True}
            pieces: list[str] = []
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
                request_id = r.headers["x-llooma-request-id"]
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = orjson.loads(line.removeprefix("data: "))
                    assert "error" not in event, event
                    if event["choices"]:
                        pieces.append(event["choices"][0]["delta"].get("content", ""))
                    if sum(1 for p in pieces if p) == 5 and process.poll() is None:
                        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)
    text = "".join(pieces)
    event = await race_events.wait_for(request_id)
    assert emitted, f"the heir got no prefix: {text!r} {event}"
    assert text.startswith(emitted[0])
    assert text.endswith(" and so the answer goes on.")
    event = await race_events.wait_for(request_id)
    assert event.continuations == 1
    assert event.succeeded


async def test_hedged_mode_launches_the_second_host_only_after_the_delay(
    http: httpx.AsyncClient, nc: Client, race_events: RaceEvents
) -> None:
    async def prompt(_: HostTask, reply: Reply) -> None:
        await reply(HostChunk(token=HostToken(text="quick")))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop")))

    async def sluggish(_: HostTask, reply: Reply) -> None:
        await asyncio.sleep(0.6)
        await reply(HostChunk(token=HostToken(text="late")))
        await reply(HostChunk(finished=HostFinished(finish_reason="stop")))

    async with (
        ScriptedHost(nc, "hedge-prompt", HEDGED_MODEL, prompt),
        ScriptedHost(nc, "hedge-sluggish", HEDGED_MODEL, sluggish),
    ):
        await wait_listed(http, HEDGED_MODEL, hosts=2)
        seen_first = set()
        for _ in range(12):
            response = await http.post(
                "/v1/chat/completions", json=chat(HEDGED_MODEL), headers=AUTH
            )
            assert response.status_code == 200
            event = await race_events.wait_for(response.headers["x-llooma-request-id"])
            first = min(event.attempts, key=lambda a: a.launched_after_ms)
            seen_first.add(first.host_id)
            if first.host_id == "hedge-prompt":
                assert len(event.attempts) == 1, "no hedge when the first host is quick"
            else:
                hedge = [a for a in event.attempts if a.role == ATTEMPT_ROLE_HEDGE]
                assert len(hedge) == 1
                assert HEDGE_DELAY_MS <= hedge[0].launched_after_ms < HEDGE_DELAY_MS + 100
                assert event.winner_host_id == "hedge-prompt"
                assert response.json()["choices"][0]["message"]["content"] == "quick"
        assert seen_first == {"hedge-prompt", "hedge-sluggish"}


async def test_a_settlement_the_stream_refuses_is_not_retried() -> None:
    """A BadRequest is the stream's answer about this message: retrying it for a minute would
    only hold the consumer slot (an in-memory stand-in for JetStream; one call, no NATS)."""
    calls: list[str] = []

    class Refusing:
        async def publish(self, subject: str, *_: object, **__: object) -> None:
            calls.append(subject)
            raise BadRequestError(code=400, description="refused")

    io = NatsIO(None, Refusing(), "unit")  # type: ignore[arg-type]
    started = time.monotonic()
    await io.publish(subjects.SETTLEMENT_TASK, b"", "attempt")
    assert calls == [subjects.SETTLEMENT_TASK]
    assert time.monotonic() - started < 0.5


async def test_a_continuation_on_a_pool_host_settles_as_fallback_at_the_asked_models_price() -> (
    None
):
    """Settlement fields of a race whose stream stalled and was continued on a fallback-pool
    host (report.settlements, the pure function the racer publishes from; no NATS)."""
    raced = HostCandidate(host_id="raced", model="served-a")
    pool = HostCandidate(host_id="pool", model="served-b")
    assignment = TaskAssignment(
        task_id="t",
        request=ChatRequest(request_id="r", model="asked", api_key_id="k"),
        hosts=[raced],
        fallback=[pool],
    )
    race = Race(assignment, time.monotonic(), 1.0)
    staller = Attempt("a-raced", raced, ATTEMPT_ROLE_RACER, race.started, accepted=True)
    staller.output_tokens = staller.delivered = 3
    staller.stalled = True
    heir = Attempt("a-pool", pool, ATTEMPT_ROLE_CONTINUATION, race.started, accepted=True)
    heir.output_tokens = heir.delivered = 5
    heir.usage = Usage(input_tokens=9, output_tokens=5)
    race.attempts = {a.attempt_id: a for a in (staller, heir)}
    race.winner = heir
    settled = {s.host_id: s for s in settlements(race, time.monotonic(), time.time_ns())}
    assert settled["pool"].outcome == ATTEMPT_OUTCOME_WON
    assert settled["pool"].fallback
    assert not settled["raced"].fallback
    assert settled["raced"].winner_fallback
    assert {s.requested_model for s in settled.values()} == {"asked"}
    assert settled["pool"].model == "served-b"
