"""API keys are kept only as hashes: after a run, no raw key is in the database, in anything
the stack wrote to disk (logs at DEBUG, the NATS store), or in the traces it exported."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest

from llooma.processes import free_port
from llooma.settings import api_key_id
from llooma.stack import Stack
from tests.support.ledger_db import new_database
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, exporting_to

KEY = f"sk-hash-test-{secrets.token_hex(12)}"
WRONG_KEY = f"sk-wrong-{secrets.token_hex(12)}"


@pytest.fixture
def traced_stack(receiver: OtlpReceiver, database_url: str, tmp_path: Path) -> Iterator[Stack]:
    # Its own NATS server (and so its own store to search), traced, logging everything.
    running = Stack(
        root=tmp_path / "stack",
        http_port=free_port(),
        database_url=new_database(database_url, "keys"),
        extra_env={
            "LLOOMA_API_KEYS": KEY,
            "LLOOMA_OPENING_BALANCE_MICROS": "1000000000000",
            # Room for three requests, so the fourth takes the rate-limit path: one a minute
            # saved up for 3 minutes (at 4 a minute, the sliding window's carry let a fourth
            # in when the first three took over 11 s on a loaded machine).
            "LLOOMA_RATE_LIMITS_BY_KEY": orjson.dumps({KEY: {"rpm": 1}}).decode(),
            "LLOOMA_RATE_LIMIT_BURST_S": "180",
            "LLOOMA_LOG_LEVEL": "DEBUG",
            **exporting_to(receiver),
        },
    )
    running.start()
    yield running
    running.stop()


def use_every_path(base_url: str) -> list[int]:
    """Success (whole and streamed, direct and orchestrated), refusals of every kind."""
    auth = {"Authorization": f"Bearer {KEY}"}
    statuses = []
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        for model, stream in (("echo", False), ("llooma", True), ("echo", True)):
            body = {
                "model": model,
                "stream": stream,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "Say hi."}],
            }
            statuses.append(
                client.post("/v1/chat/completions", json=body, headers=auth).status_code
            )
        statuses.append(client.get("/v1/models", headers=auth).status_code)
        wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
        statuses.append(client.post("/v1/chat/completions", json={}, headers=wrong).status_code)
        statuses.append(client.post("/v1/chat/completions", content=b"{", headers=auth).status_code)
        body = {"model": "echo", "messages": [{"role": "user", "content": "over the limit"}]}
        statuses.append(client.post("/v1/chat/completions", json=body, headers=auth).status_code)
    return statuses


async def database_text(database_url: str) -> str:
    connection = await asyncpg.connect(database_url)
    try:
        tables = await connection.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_type = 'BASE TABLE'"
            " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        dumps = []
        for table in tables:
            name = f'"{table["table_schema"]}"."{table["table_name"]}"'
            dumps.append(
                await connection.fetchval(f"SELECT string_agg(t::text, E'\\n') FROM {name} t")
            )
        return "\n".join(d for d in dumps if d)
    finally:
        await connection.close()


def span_text(spans: list[ReceivedSpan]) -> str:
    return "\n".join(text for span in spans for text in span.texts())


@pytest.mark.timeout(240)
async def test_no_raw_api_key_in_database_files_or_traces(
    traced_stack: Stack, receiver: OtlpReceiver
) -> None:
    assert traced_stack.database_url is not None
    database_url = traced_stack.database_url
    statuses = use_every_path(traced_stack.base_url)
    assert statuses == [200, 200, 200, 200, 401, 400, 429]

    # Wait until the run's settlements are in the ledger (under the key's hash) ...
    key_id = api_key_id(KEY)
    deadline = time.monotonic() + 30
    stored = await database_text(database_url)
    while key_id not in stored and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        stored = await database_text(database_url)
    assert key_id in stored, "the run left no trace in the database: nothing was searched"
    spans = receiver.wait_for(lambda got: any(s.service == "accounting" for s in got), 30.0)
    assert spans, "no spans exported: nothing was searched"
    traced_stack.stop()  # flush every log file

    files = [p for p in traced_stack.root.rglob("*") if p.is_file()]
    logs = [p for p in files if p.suffix == ".log"]
    assert logs
    assert sum(p.stat().st_size for p in logs) > 0
    for raw in (KEY, WRONG_KEY):
        assert raw not in stored
        assert raw not in span_text(spans)
        leaked = [str(p) for p in files if raw.encode() in p.read_bytes()]
        assert not leaked, f"raw key found in {leaked}"
