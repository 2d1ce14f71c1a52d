"""The floor (`llooma.bench.floor`) does the work it is measured for: with either kind of
hand-off, each request crosses every one of its processes, the official client reads the
upstream's whole answer from it, and each request's settlement lands in Postgres."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import openai
import pytest

from llooma.bench.floor import API_KEY, HAND_OFFS, Floor
from llooma.processes import free_port, wait_for_port

CHUNKS = 5


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llooma.bench.upstream", "--port", str(port), "--chunks", "5"]
    )
    try:
        wait_for_port(port, 30.0, process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("hand_offs", HAND_OFFS)
async def test_each_request_crosses_the_floor_and_is_settled(
    hand_offs: str, upstream_url: str, tmp_path: Path
) -> None:
    floor = Floor(tmp_path, upstream_url, hand_offs)
    await asyncio.to_thread(floor.start)
    try:
        assert set(floor.processes()) == {
            "ingress", "privacy", "dispatcher", "racer", "host", "accounting",
            "nats-server", "postgres",
        }  # fmt: skip
        assert floor.postgres is not None
        db = await asyncpg.connect(floor.postgres.url)
        settled_before = await db.fetchval("SELECT count(*) FROM settlements")
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{floor.http_port}/v1", api_key=API_KEY
        )
        for _ in range(3):
            stream = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            assert text == "tok " * CHUNKS
        await client.close()
        for _ in range(100):
            settled = await db.fetchval("SELECT count(*) FROM settlements") - settled_before
            if settled >= 3:
                break
            await asyncio.sleep(0.1)
        assert settled == 3
        await db.close()
        wrong_key = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{floor.http_port}/v1", api_key="sk-wrong"
        )
        with pytest.raises(openai.AuthenticationError):
            await wrong_key.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        await wrong_key.close()
    finally:
        await asyncio.to_thread(floor.stop)
