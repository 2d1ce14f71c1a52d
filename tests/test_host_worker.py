"""The host worker's config, synthetic backend and policies."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import subjects
from llooma.host.backends import BackendFailure, SyntheticBackend
from llooma.host.config import (
    Generation,
    HostConfig,
    HostConfigError,
    Latency,
    ModelConfig,
    Policy,
    load_host_config,
)
from llooma.host.worker import HostWorker
from llooma.v1.common_pb2 import ERROR_CODE_HOST_BUSY, ChatMessage, GenerationParams
from llooma.v1.host_pb2 import HostChunk, HostTask


def task(prompt: str, max_tokens: int = 0, seed: int = 0) -> HostTask:
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


async def ask(nc: Client, host_id: str, model: str) -> list[HostChunk]:
    inbox = nc.new_inbox()
    chunks: list[HostChunk] = []
    done = asyncio.Event()

    async def on_chunk(msg: Msg) -> None:
        chunk = HostChunk.FromString(msg.data)
        chunks.append(chunk)
        if chunk.WhichOneof("event") in ("finished", "failed"):
            done.set()

    subscription = await nc.subscribe(inbox, cb=on_chunk)
    request = task("hello")
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
