"""Managed API keys end to end on two ingresses: created through the admin API (and the CLI),
used, refused once their budget is spent (402), topped up, limited to their models, expired,
revoked (401 on both ingresses within 1 s), changed (on both within 1 s); spend per key equals
the ledger's charges; every refusal is counted by status and reason, in /v1/stats and
/metrics."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llooma.keys import KeyRecord
from llooma.settings import DEV_API_KEY, api_key_id
from llooma.stack import Stack
from tests.support.extra_processes import extra_ingress

BODY = {"model": "echo", "max_tokens": 4, "messages": [{"role": "user", "content": "hi there"}]}


@pytest.fixture(scope="module")
def second_ingress(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with extra_ingress(stack, tmp_path_factory.mktemp("keys"), {}) as base_url:
        yield base_url


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    key = stack.admin_key_file.read_text().strip()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def chat(base_url: str, key: str, body: dict[str, Any] | None = None) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=body or BODY,
            headers={"Authorization": f"Bearer {key}"},
        )
        return response.status_code


async def until_status(urls: list[str], key: str, status: int, timeout_s: float) -> float:
    """Seconds until every ingress answers `key` with `status`."""
    started = time.monotonic()
    pending = list(urls)
    while pending:
        pending = [url for url in pending if await chat(url, key) != status]
        if pending and time.monotonic() - started > timeout_s:
            raise AssertionError(f"{pending} did not answer {status} in {timeout_s} s")
    return time.monotonic() - started


def test_keys_are_hashed_with_the_server_secret() -> None:
    # Not the unsalted SHA-256 a lookup table of weak keys reverses.
    assert api_key_id(DEV_API_KEY) != hashlib.sha256(DEV_API_KEY.encode()).hexdigest()[:32]
    assert api_key_id(DEV_API_KEY, b"one secret") != api_key_id(DEV_API_KEY, b"another")
    assert len(api_key_id(DEV_API_KEY)) == 32


def test_a_record_expires_and_limits_its_models() -> None:
    record = KeyRecord(key_id="k", name="n", models=("echo",), expires_unix_ms=1000)
    assert record.expired(1000)
    assert not record.expired(999)
    assert record.allows("echo")
    assert not record.allows("synthetic-small")
    assert KeyRecord.decode(record.encode()) == record
    assert KeyRecord(key_id="k", name="n").allows("anything")


async def test_key_lifecycle_on_two_ingresses(
    stack: Stack, second_ingress: str, admin: httpx.AsyncClient, db: asyncpg.Connection
) -> None:
    urls = [stack.base_url, second_ingress]
    created = await admin.post("/admin/v1/keys", json={"name": "lifecycle", "budget": "0.0015"})
    assert created.status_code == 201, created.text
    record = created.json()
    key, key_id = record["key"], record["key_id"]
    assert key_id == api_key_id(key)
    assert record["balance_micros"] == 1500
    # Shown once: neither the listing nor Postgres holds the key itself.
    listed = (await admin.get("/admin/v1/keys")).json()["data"]
    assert key_id in {r["key_id"] for r in listed}
    assert key not in orjson.dumps(listed).decode()
    stored = await db.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
    assert stored is not None
    assert key not in str(dict(stored))

    await until_status(urls, key, 200, timeout_s=1.0)
    # Spend it: each echo request costs 20 micro-credits per token.
    spent_at = time.monotonic()
    while time.monotonic() - spent_at < 30:
        if await chat(urls[0], key) == 402:
            break
        await asyncio.sleep(0.05)
    await until_status(urls, key, 402, timeout_s=5.0)

    topped = await admin.patch(f"/admin/v1/keys/{key_id}", json={"add_budget": "1"})
    assert topped.status_code == 200, topped.text
    assert topped.json()["balance_micros"] > 0
    await until_status(urls, key, 200, timeout_s=3.0)

    revoked = await admin.delete(f"/admin/v1/keys/{key_id}")
    assert revoked.status_code == 200
    assert await until_status(urls, key, 401, timeout_s=1.0) < 1.0
    again = await admin.patch(f"/admin/v1/keys/{key_id}", json={"rpm": 5})
    assert again.status_code == 409

    # Spend per key is the ledger's: the key's charge legs, by model.
    async def charged() -> int:
        total: int = await db.fetchval(
            "SELECT coalesce(-sum(amount), 0)::int8 FROM ledger_entries "
            "WHERE account = $1 AND kind IN ('charge', 'refund')",
            f"user:{key_id}",
        )
        return total

    # Once the last settlements are in (they trail the answers by a batch).
    usage: dict[str, Any] = {}
    for _ in range(50):
        before = await charged()
        usage = (await admin.get("/admin/v1/usage", params={"key": key_id})).json()
        if usage["totals"]["credits_micros"] == before == await charged():
            break
        await asyncio.sleep(0.2)
    assert usage["totals"]["credits_micros"] == await charged() > 0
    assert {line["model"] for line in usage["data"]} == {"echo"}
    assert usage["totals"]["requests"] >= 2
    future = await admin.get("/admin/v1/usage", params={"key": key_id, "since": "2999-01-01"})
    assert future.json()["totals"]["credits_micros"] == 0

    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        stats = (await client.get("/v1/stats")).json()["rejections"]["by_status"]
        metrics = (await client.get("/metrics")).text
    assert stats["402"]["insufficient_balance"] >= 1
    assert stats["401"]["invalid_api_key"] >= 1
    assert 'llooma_requests_rejected_total{error_type="insufficient_balance"' in metrics


async def test_a_change_takes_effect_on_both_ingresses_within_1_s(
    stack: Stack, second_ingress: str, admin: httpx.AsyncClient
) -> None:
    urls = [stack.base_url, second_ingress]
    created = (await admin.post("/admin/v1/keys", json={"name": "changed", "budget": 5})).json()
    key, key_id = created["key"], created["key_id"]
    await until_status(urls, key, 200, timeout_s=1.0)
    narrowed = await admin.patch(f"/admin/v1/keys/{key_id}", json={"models": ["synthetic-small"]})
    assert narrowed.status_code == 200, narrowed.text
    assert await until_status(urls, key, 404, timeout_s=1.0) < 1.0
    widened = await admin.patch(f"/admin/v1/keys/{key_id}", json={"models": []})
    assert widened.status_code == 200, widened.text
    assert await until_status(urls, key, 200, timeout_s=1.0) < 1.0
    expired = await admin.patch(f"/admin/v1/keys/{key_id}", json={"expires_at": time.time() - 1})
    assert expired.status_code == 200, expired.text
    assert await until_status(urls, key, 401, timeout_s=1.0) < 1.0


def rejection_metrics(text: str) -> dict[tuple[str, str], float]:
    """/metrics' refusal counter: (status, reason) -> count."""
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "llooma_requests_rejected":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = sample.labels
                counts[(labels["http_response_status_code"], labels["error_type"])] = sample.value
    return counts


async def rejections(
    client: httpx.AsyncClient,
) -> tuple[dict[str, Any], dict[tuple[str, str], float]]:
    """/v1/stats' refusals once no other ingress's tally (about one a second) is on its way,
    and this process's /metrics."""
    stats: dict[str, Any] = {}
    for _ in range(20):
        previous = stats
        stats = (await client.get("/v1/stats")).json()["rejections"]["by_status"]
        if stats == previous:
            break
        await asyncio.sleep(1.5)
    return stats, rejection_metrics((await client.get("/metrics")).text)


async def test_every_refusal_is_counted_by_status_and_reason(
    stack: Stack, admin: httpx.AsyncClient
) -> None:
    slow = (
        await admin.post("/admin/v1/keys", json={"name": "rpm-2", "budget": 5, "rpm": 2})
    ).json()
    small = (
        await admin.post("/admin/v1/keys", json={"name": "tpm", "budget": 5, "tpm": 100})
    ).json()
    broke = (await admin.post("/admin/v1/keys", json={"name": "broke", "budget": 0})).json()
    await until_status([stack.base_url], small["key"], 200, timeout_s=1.0)
    huge = {**BODY, "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 1)}]}
    refusals: list[tuple[str, dict[str, Any], tuple[int, str]]] = [
        ("sk-no-such-key", BODY, (401, "invalid_api_key")),
        (broke["key"], BODY, (402, "insufficient_balance")),
        (DEV_API_KEY, {**BODY, "model": "no-such-model"}, (404, "model_not_found")),
        (DEV_API_KEY, huge, (413, "body_too_large")),
        (small["key"], {**BODY, "max_tokens": 1000}, (413, "tokens_exceed_limit")),
    ]
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        # rpm 2 with a one-second burst: the bucket holds one request, the second is refused.
        assert await chat(stack.base_url, slow["key"]) == 200
        stats_before, metrics_before = await rejections(client)
        statuses = [await chat(stack.base_url, key, body) for key, body, _ in refusals]
        statuses.append(await chat(stack.base_url, slow["key"]))
        stats_after, metrics_after = await rejections(client)
    expected = [kind for _, _, kind in refusals] + [(429, "rate_limit_exceeded")]
    assert statuses == [status for status, _ in expected]
    for status, reason in expected:
        label = (str(status), reason)
        count_before = stats_before.get(str(status), {}).get(reason, 0)
        assert stats_after[str(status)][reason] - count_before == 1, label
        assert metrics_after[label] - metrics_before.get(label, 0.0) == 1.0, label


async def test_models_expiry_and_rates_of_a_managed_key(
    stack: Stack, admin: httpx.AsyncClient
) -> None:
    narrow = (
        await admin.post(
            "/admin/v1/keys", json={"name": "echo-only", "budget": 5, "models": ["echo"], "rpm": 2}
        )
    ).json()
    await until_status([stack.base_url], narrow["key"], 200, timeout_s=1.0)
    other = {**BODY, "model": "synthetic-small"}
    assert await chat(stack.base_url, narrow["key"], other) == 404
    # rpm 2 with a one-second burst: the bucket holds one request.
    assert await chat(stack.base_url, narrow["key"]) == 429
    expired = (
        await admin.post(
            "/admin/v1/keys", json={"name": "expired", "budget": 5, "expires_at": time.time() - 1}
        )
    ).json()
    assert await chat(stack.base_url, expired["key"]) == 401
    wrong = await admin.get("/admin/v1/keys", headers={"Authorization": f"Bearer {narrow['key']}"})
    assert wrong.status_code == 401


def keys_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    assert stack.nats_url is not None
    connection = ["--nats-url", stack.nats_url, "--seed", stack.control_seed or ""]
    return subprocess.run(
        [sys.executable, "-m", "llooma.cli", "keys", *args, *connection],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_cli_creates_lists_updates_and_revokes(stack: Stack) -> None:
    made = await asyncio.to_thread(
        keys_cli, stack, "create", "from-cli", "--owner", "ops", "--budget", "2", "--json"
    )
    assert made.returncode == 0, made.stdout + made.stderr
    created = orjson.loads(made.stdout)
    assert await chat(stack.base_url, created["key"]) == 200
    listed = await asyncio.to_thread(keys_cli, stack, "list", "--owner", "ops", "--json")
    assert created["key_id"] in listed.stdout
    topped = await asyncio.to_thread(
        keys_cli, stack, "update", created["key_id"], "--add-budget", "1", "--json"
    )
    assert orjson.loads(topped.stdout)["balance_micros"] > 2_000_000 - 10_000
    gone = await asyncio.to_thread(keys_cli, stack, "revoke", "from-cli")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    await until_status([stack.base_url], created["key"], 401, timeout_s=1.0)
    usage = await asyncio.to_thread(keys_cli, stack, "usage", created["key_id"])
    assert usage.returncode == 0, usage.stdout + usage.stderr
    assert "total" in usage.stdout
