"""The host worker's config, synthetic backend and policies."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import subjects
from llooma.host.backends import BackendFailure, SyntheticBackend
from llooma.host.config import (
    Features,
    Generation,
    HostConfig,
    HostConfigError,
    Latency,
    ModelConfig,
    Policy,
    load_host_config,
)
from llooma.host.worker import HostWorker
from llooma.v1.common_pb2 import (
    ERROR_CODE_HOST_BUSY,
    ERROR_CODE_REQUEST_REJECTED,
    ChatMessage,
    GenerationParams,
    Usage,
)
from llooma.v1.host_pb2 import CancelTask, HostChunk, HostHeartbeat, HostTask, ModelFeatures
from services.racer.chunks import one_by_one
from tests.support.fake_engine import DONE, FakeEngine, Out, Request, delta, stream_events, usage


def task(prompt: str, max_tokens: int | None = None, seed: int | None = None) -> HostTask:
    return HostTask(
        attempt_id=uuid.uuid4().hex,
        model="m",
        messages=[ChatMessage(role="user", content=prompt)],
        params=GenerationParams(max_tokens=max_tokens, seed=seed),
    )


async def collect(backend: SyntheticBackend, request: HostTask) -> str:
    return "".join([piece async for piece in backend.stream(request)])


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(HostConfigError, match="not valid YAML"):
        load_host_config(broken)
    missing = tmp_path / "missing.yaml"
    missing.write_text("name: h1\n")
    with pytest.raises(HostConfigError, match="models: Field required"):
        load_host_config(missing)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: h1\nmodels:\n  - name: m\n    capacity: lots\n")
    with pytest.raises(HostConfigError, match=r"models\.0\.capacity"):
        load_host_config(wrong)
    openai = tmp_path / "openai.yaml"
    openai.write_text("name: h1\nmodels:\n  - name: m\n    backend: openai\n")
    with pytest.raises(HostConfigError, match="base_url is required"):
        load_host_config(openai)
    bad_name = tmp_path / "bad-name.yaml"
    bad_name.write_text("name: a.b\nmodels:\n  - name: m\n")
    with pytest.raises(HostConfigError, match="subject token"):
        load_host_config(bad_name)
    with pytest.raises(HostConfigError, match="cannot read"):
        load_host_config(tmp_path / "absent.yaml")


async def test_synthetic_is_seeded_and_follows_the_requested_format() -> None:
    model = ModelConfig(name="m", generation=Generation(max_tokens=40))
    first = await collect(SyntheticBackend(model, 1), task("say something", seed=7))
    again = await collect(SyntheticBackend(model, 2), task("say something", seed=7))
    assert first == again
    as_json = await collect(SyntheticBackend(model, 1), task("answer in JSON please", seed=3))
    assert set(json.loads(as_json)) == {"summary", "details"}
    markdown = await collect(SyntheticBackend(model, 1), task("use markdown", seed=3))
    assert markdown.startswith("## ")
    assert "\n- " in markdown
    short = await collect(SyntheticBackend(model, 1), task("prose", max_tokens=5, seed=3))
    assert len(short.split()) == 5


async def test_synthetic_stalls_and_fails_when_told_to() -> None:
    stalling = ModelConfig(name="m", stall_probability=1.0)
    pieces: list[str] = []

    async def read() -> None:
        async for piece in SyntheticBackend(stalling, 1).stream(task("x", max_tokens=20)):
            pieces.append(piece)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(read(), timeout=0.3)
    assert len(pieces) < 20
    failing = ModelConfig(name="m", failure_probability=1.0)
    with pytest.raises(BackendFailure):
        await collect(SyntheticBackend(failing, 1), task("x", max_tokens=20))


async def test_lognormal_latency_is_drawn_per_task() -> None:
    model = ModelConfig(
        name="m",
        generation=Generation(max_tokens=1),
        first_token=Latency(kind="lognormal", median_ms=5, sigma=1.0),
    )
    backend = SyntheticBackend(model, 4)
    loop = asyncio.get_running_loop()
    durations = []
    for _ in range(6):
        started = loop.time()
        await collect(backend, task("x"))
        durations.append(loop.time() - started)
    assert max(durations) > 1.5 * min(durations)


async def ask(
    nc: Client, host_id: str, model: str, request: HostTask | None = None
) -> list[HostChunk]:
    inbox = nc.new_inbox()
    chunks: list[HostChunk] = []
    done = asyncio.Event()

    async def on_chunk(msg: Msg) -> None:
        chunk = HostChunk.FromString(msg.data)
        chunks.extend(one_by_one(chunk))  # as the racer reads a chunk of batched tokens
        if chunk.WhichOneof("event") in ("finished", "failed"):
            done.set()

    subscription = await nc.subscribe(inbox, cb=on_chunk)
    request = request or task("hello")
    request.model = model
    await nc.publish(subjects.host_task(model, host_id), request.SerializeToString(), reply=inbox)
    await asyncio.wait_for(done.wait(), 5)
    await subscription.unsubscribe()
    return chunks


async def test_capacity_gives_an_explicit_busy_reply(nc: Client, nats_url: str) -> None:
    host_id = f"cap-{uuid.uuid4().hex[:6]}"
    slow = ModelConfig(
        name="slow", capacity=1, inter_token=Latency(ms=200), generation=Generation(max_tokens=5)
    )
    worker = HostWorker(HostConfig(name=host_id, nats_url=nats_url, models=[slow]), nc)
    await worker.start()
    try:
        first = asyncio.create_task(ask(nc, host_id, "slow"))
        await asyncio.sleep(0.1)
        second = await ask(nc, host_id, "slow")
        assert second[-1].WhichOneof("event") == "failed"
        assert second[-1].failed.code == ERROR_CODE_HOST_BUSY
        assert "capacity" in second[-1].failed.message
        assert (await first)[-1].WhichOneof("event") == "finished"
    finally:
        await worker.drain()


async def test_a_resting_host_beats_on_its_long_wait_and_a_task_brings_a_short_beat_at_once(
    nc: Client, nats_url: str
) -> None:
    host_id = f"pace-{uuid.uuid4().hex[:6]}"
    model = ModelConfig(
        name="paced", inter_token=Latency(ms=100), generation=Generation(max_tokens=8)
    )
    config = HostConfig(
        name=host_id,
        nats_url=nats_url,
        heartbeat_interval_s=0.1,
        idle_heartbeat_interval_s=0.8,
        models=[model],
    )
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, HostHeartbeat]] = []

    async def record() -> None:
        async for beat in heartbeats(nc, host_id):
            arrivals.append((loop.time(), beat))

    recorder = asyncio.create_task(record())
    await nc.flush()
    worker = HostWorker(config, nc)
    await worker.start()
    try:
        # At rest: each beat announces the long wait, and none comes sooner than announced.
        await beat_where(nc, host_id, lambda _: len(arrivals) >= 3, 5)
        resting = arrivals[:3]
        assert all(beat.next_beat_ms == 800 for _, beat in resting)
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(resting)]
        assert all(gap > 0.7 for gap in gaps), gaps
        # A task arrives: a beat at once announcing the short wait, and beats at that pace.
        before = len(arrivals)
        asked_at = loop.time()
        answer = asyncio.create_task(ask(nc, host_id, "paced"))
        first, took = await beat_where(nc, host_id, lambda b: b.in_flight == 1, 5)
        assert first.next_beat_ms == 100
        assert took < 0.6  # not the 0.8 s the last beat announced
        assert (await answer)[-1].WhichOneof("event") == "finished"
        serving = [(t, b) for t, b in arrivals[before:] if t >= asked_at and b.in_flight]
        assert len(serving) >= 3, serving
        # Back at rest: the long wait again.
        await beat_where(nc, host_id, lambda b: b.in_flight == 0 and b.next_beat_ms == 800, 5)
    finally:
        await worker.drain()
        recorder.cancel()


async def test_accept_frequency_declines_a_share_of_tasks(nc: Client, nats_url: str) -> None:
    host_id = f"picky-{uuid.uuid4().hex[:6]}"
    picky = ModelConfig(
        name="picky", policy=Policy(accept_frequency=0.5), generation=Generation(max_tokens=1)
    )
    worker = HostWorker(HostConfig(name=host_id, nats_url=nats_url, seed=5, models=[picky]), nc)
    await worker.start()
    try:
        outcomes = [(await ask(nc, host_id, "picky"))[-1] for _ in range(60)]
    finally:
        await worker.drain()
    declined = [c for c in outcomes if c.WhichOneof("event") == "failed"]
    assert all(c.failed.code == ERROR_CODE_HOST_BUSY for c in declined)
    assert 15 <= len(declined) <= 45


# The worker in front of a real (local, scripted) OpenAI-compatible engine.


def openai_host(host_id: str, nats_url: str, engine: FakeEngine, **model: Any) -> HostConfig:
    settings: dict[str, Any] = {
        "name": "llm",
        "backend": "openai",
        "base_url": engine.base_url,
        "engine": "llama.cpp",
        **model,
    }
    return HostConfig(
        name=host_id,
        nats_url=nats_url,
        engine_probe_interval_s=0.2,
        engine_probe_timeout_s=0.5,
        heartbeat_interval_s=0.2,
        models=[ModelConfig(**settings)],
    )


async def heartbeats(nc: Client, host_id: str) -> AsyncIterator[HostHeartbeat]:
    # What the worker sends, not the membership entry a dispatcher writes from it: this file
    # runs no dispatcher of its own.
    subject = subjects.host_heartbeat(host_id)
    queue: asyncio.Queue[HostHeartbeat] = asyncio.Queue()

    async def on_beat(msg: Msg) -> None:
        queue.put_nowait(HostHeartbeat.FromString(msg.data))

    subscription = await nc.subscribe(subject, cb=on_beat)
    try:
        while True:
            yield await queue.get()
    finally:
        await subscription.unsubscribe()


async def beat_where(
    nc: Client, host_id: str, check: Callable[[HostHeartbeat], bool], within_s: float
) -> tuple[HostHeartbeat, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def first() -> HostHeartbeat:
        async for beat in heartbeats(nc, host_id):
            if check(beat):
                return beat
        raise AssertionError("unreachable")

    beat = await asyncio.wait_for(first(), within_s)
    return beat, loop.time() - started


def test_features_engine_and_engine_id_in_the_heartbeat(nc: Client) -> None:
    llama = ModelConfig(
        name="a", backend="openai", base_url="http://127.0.0.1:8080/v1", engine="llama.cpp"
    )
    same_engine = ModelConfig(
        name="b",
        backend="openai",
        base_url="http://127.0.0.1:8080/v1/",
        engine="llama.cpp",
        features=Features(tools=False, reasoning=True),
    )
    vllm = ModelConfig(name="c", backend="openai", base_url="http://gpu:8000/v1", engine="vllm")
    synthetic = ModelConfig(name="d")
    config = HostConfig(name="h", models=[llama, same_engine, vllm, synthetic])
    beat = HostWorker(config, nc).heartbeat()
    models = {m.name: m for m in beat.models}
    assert models["a"].engine == "llama.cpp"
    assert models["a"].features == ModelFeatures(
        tools=True, json_mode=True, json_schema=True, logprobs=True, assistant_prefill=True
    )
    assert models["b"].features.reasoning
    assert not models["b"].features.tools
    assert models["a"].engine_id == models["b"].engine_id != models["c"].engine_id
    assert models["c"].engine == "vllm"
    assert models["c"].features.assistant_prefill
    assert models["d"].engine == "synthetic"
    assert models["d"].features.assistant_prefill
    assert models["d"].engine_id not in (models["a"].engine_id, models["c"].engine_id)


async def test_engine_usage_reasoning_and_finish_reach_the_racer(nc: Client, nats_url: str) -> None:
    async def thinking(request: Request, out: Out) -> None:
        if request.path != "/v1/chat/completions":
            await out.whole(200, b"llamacpp:requests_processing 0\n", "text/plain")
            return
        await stream_events(
            out,
            delta(reasoning="Think."),
            delta("Hi"),
            delta(None, finish="stop"),
            usage(21, 24),
            DONE,
        )

    async with FakeEngine(handler=thinking) as engine:
        host_id = f"oa-{uuid.uuid4().hex[:6]}"
        worker = HostWorker(openai_host(host_id, nats_url, engine), nc)
        await worker.start()
        try:
            chunks = await ask(nc, host_id, "llm", task("hello", max_tokens=0, seed=0))
        finally:
            await worker.drain()
    tokens = [c.token for c in chunks if c.WhichOneof("event") == "token"]
    assert [(t.text, t.reasoning) for t in tokens] == [("", "Think."), ("Hi", "")]
    finished = chunks[-1].finished
    assert finished.finish_reason == "stop"
    assert finished.usage == Usage(input_tokens=21, output_tokens=24, reported_by_engine=True)
    sent = next(r for r in engine.requests if r.path.endswith("/chat/completions")).json()
    assert sent["max_tokens"] == 0
    assert sent["seed"] == 0


async def test_engine_refusal_is_a_rejected_request(nc: Client, nats_url: str) -> None:
    overflow = {
        "error": {
            "code": 400,
            "message": "request (4476 tokens) exceeds the available context size (2048 tokens)",
            "type": "exceed_context_size_error",
        }
    }

    async def refuse(request: Request, out: Out) -> None:
        if request.path.endswith("/chat/completions"):
            await out.whole(400, json.dumps(overflow).encode())
        else:
            await out.whole(200, b"", "text/plain")

    async with FakeEngine(handler=refuse) as engine:
        host_id = f"rej-{uuid.uuid4().hex[:6]}"
        worker = HostWorker(openai_host(host_id, nats_url, engine), nc)
        await worker.start()
        try:
            chunks = await ask(nc, host_id, "llm")
        finally:
            await worker.drain()
    failed = chunks[-1].failed
    assert failed.code == ERROR_CODE_REQUEST_REJECTED
    assert failed.http_status == 400
    assert failed.client_code == "context_length_exceeded"
    assert "exceeds the available context size" in failed.message


async def test_engine_load_and_an_engine_that_stops_answering(nc: Client, nats_url: str) -> None:
    metrics = b"llamacpp:requests_processing 3\nllamacpp:requests_deferred 2\n"

    async def gauges(request: Request, out: Out) -> None:
        await out.whole(200, metrics, "text/plain")

    engine = await FakeEngine(handler=gauges).start()
    host_id = f"health-{uuid.uuid4().hex[:6]}"
    worker = HostWorker(openai_host(host_id, nats_url, engine, capacity=10), nc)
    await worker.start()
    try:
        beat, _ = await beat_where(nc, host_id, lambda b: b.models[0].engine_running == 3, 3)
        model = beat.models[0]
        assert (model.engine_waiting, model.engine_unreachable) == (2, False)
        assert beat.load == pytest.approx(0.5)
        assert beat.queue_depth == 2
        port = engine.port
        await engine.stop()
        beat, took = await beat_where(nc, host_id, lambda b: b.models[0].engine_unreachable, 3)
        assert took < 2.0
        await engine.start(port)
        await beat_where(nc, host_id, lambda b: not b.models[0].engine_unreachable, 3)
    finally:
        await worker.drain()
        await engine.stop()


async def test_cancelled_races_through_the_worker(nc: Client, nats_url: str) -> None:
    """The racer cancels a loser at every race: the worker's engine connections stay within
    its capacity and it still answers."""

    async def tokens(request: Request, out: Out) -> None:
        if not request.path.endswith("/chat/completions"):
            await out.whole(200, b"", "text/plain")
            return
        await out.head(200, {"Content-Type": "text/event-stream"})
        for piece in ("a", "b", "c"):
            await asyncio.sleep(0.002)
            await out.chunk(delta(piece))
        await out.chunk(usage(5, 3) + DONE)
        await out.end()

    async with FakeEngine(handler=tokens) as engine:
        host_id = f"races-{uuid.uuid4().hex[:6]}"
        worker = HostWorker(openai_host(host_id, nats_url, engine, capacity=4), nc)
        await worker.start()
        rng = random.Random(3)
        try:
            for _ in range(60):
                loser = task("race")
                loser.model = "llm"
                inbox = nc.new_inbox()
                await nc.publish(
                    subjects.host_task("llm", host_id), loser.SerializeToString(), reply=inbox
                )
                winner = asyncio.create_task(ask(nc, host_id, "llm"))
                await asyncio.sleep(rng.choice((0, 0.001, 0.003, 0.006)))
                cancel = CancelTask(attempt_id=loser.attempt_id)
                await nc.publish(subjects.host_cancel(host_id), cancel.SerializeToString())
                assert (await winner)[-1].WhichOneof("event") == "finished"
            assert engine.peak_connections <= 4
            assert await engine.wait_connections(4) <= 4
            assert (await ask(nc, host_id, "llm"))[-1].finished.usage.reported_by_engine
        finally:
            await worker.drain()


@pytest.mark.parametrize(
    ("rendered", "expected"),
    [
        # A Jinja template: the prompt ends with the assistant's text, to be continued.
        ("<start_of_turn>model\nllooma-prefill-probe", True),
        # A legacy built-in template (--no-jinja): the turn is closed.
        ("<start_of_turn>model\nllooma-prefill-probe<end_of_turn>\n", False),
        (None, True),  # no /apply-template: the engine's default
    ],
    ids=["jinja", "legacy", "unknown"],
)
async def test_llama_cpp_prefill_is_read_from_the_engine(
    nc: Client, nats_url: str, rendered: str | None, expected: bool
) -> None:
    async def server(request: Request, out: Out) -> None:
        if request.path == "/apply-template" and rendered is not None:
            await out.whole(200, json.dumps({"prompt": rendered}).encode())
        elif request.path == "/health":
            await out.whole(200, b"{}")
        else:
            await out.whole(404, b"")

    async with FakeEngine(handler=server) as engine:
        host_id = f"prefill-{uuid.uuid4().hex[:6]}"
        worker = HostWorker(openai_host(host_id, nats_url, engine), nc)
        await worker.start()
        try:
            capability = worker.heartbeat().models[0]
        finally:
            await worker.drain()
    assert capability.features.assistant_prefill is expected
    assert not capability.engine_unreachable
