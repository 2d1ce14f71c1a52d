"""Billing through the running stack: 402 without balance, charges and payouts from real races,
idempotent settlement over JetStream, duels posted, the summary in KV, and the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import asyncpg
import httpx
import pytest
from nats.aio.client import Client

from llooma import bus, subjects
from llooma.ledger.economics import host_account, user_account
from llooma.settings import DEV_API_KEY, api_key_id
from llooma.stack import Stack
from llooma.v1.common_pb2 import Usage
from llooma.v1.duel_pb2 import DUEL_VERDICT_B, DUEL_VERDICT_UNSPECIFIED, DuelResult, JudgeVote
from llooma.v1.ledger_pb2 import LedgerSummary
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_LOST, TaskSettlement
from tests.conftest import AUTH, NO_BALANCE_KEY

# The defaults in settings.py: what a user pays per token, a winner earns per output token.
USER_PRICE = 20
HOST_PRICE = 10
T = TypeVar("T")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout_s: float = 30.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.1)


async def test_a_key_without_balance_gets_402(http: httpx.AsyncClient) -> None:
    body = {"model": "synthetic-small", "messages": [{"role": "user", "content": "hi"}]}
    broke = await http.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {NO_BALANCE_KEY}"}
    )
    assert broke.status_code == 402
    assert broke.json()["error"]["code"] == "insufficient_balance"
    funded = await http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert funded.status_code == 200


async def test_a_completed_request_charges_the_user_and_pays_its_hosts(
    http: httpx.AsyncClient, db: asyncpg.Connection, nc: Client
) -> None:
    body = {
        "model": "synthetic-small",
        "messages": [{"role": "user", "content": "Tell me about tide pools."}],
        "max_tokens": 16,
    }
    response = await http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200
    request_id = response.headers["x-llooma-request-id"]
    usage = response.json()["usage"]

    async def attempts() -> list[asyncpg.Record] | None:
        rows = await db.fetch(
            "SELECT attempt_id, host_id, outcome, output_tokens FROM task_settlements "
            "WHERE request_id = $1",
            request_id,
        )
        won = [f"attempt:{r['attempt_id']}" for r in rows if r["outcome"] == "won"]
        posted = await db.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE txn_id = ANY($1::text[])", won
        )
        return rows if len(rows) >= 2 and won and posted else None

    rows = await eventually(attempts)
    winner = next(r for r in rows if r["outcome"] == "won")
    legs = {
        (r["account"], r["kind"]): r["amount"]
        for r in await db.fetch(
            "SELECT account, kind, amount FROM ledger_entries WHERE txn_id = $1",
            f"attempt:{winner['attempt_id']}",
        )
    }
    key_id = api_key_id(DEV_API_KEY)
    assert legs[(user_account(key_id), "charge")] == -USER_PRICE * usage["total_tokens"]
    # Against what the client was told it got, not what the settlement path itself wrote.
    assert legs[(host_account(winner["host_id"]), "payout")] == (
        HOST_PRICE * usage["completion_tokens"]
    )
    # The user's balance in KV (what the ingress reads) is the ledger's, once settled.
    kv = await nc.jetstream().key_value(subjects.BALANCES_BUCKET)

    async def settled_balance() -> int | None:
        published = int((await kv.get(key_id)).value or b"0")
        in_ledger = await db.fetchval(
            "SELECT balance FROM account_balances WHERE account = $1", user_account(key_id)
        )
        return published if published == in_ledger else None

    balance = await eventually(settled_balance)
    assert balance < 1_000_000_000_000


async def test_redelivered_settlements_post_once(nc: Client, db: asyncpg.Connection) -> None:
    settlement = TaskSettlement(
        attempt_id=uuid.uuid4().hex,
        request_id=uuid.uuid4().hex,
        task_id=uuid.uuid4().hex,
        host_id="host-redelivered",
        model="synthetic-small",
        outcome=ATTEMPT_OUTCOME_LOST,
        usage=Usage(output_tokens=4),
        winner_model="synthetic-small",
        winner_output_tokens=200,
        finished_unix_nanos=time.time_ns(),
    )
    js = nc.jetstream()
    # Distinct message ids: as if the server's duplicate window had passed each time.
    for copy in range(5):
        await bus.hand_off(
            js,
            subjects.SETTLEMENT_TASK,
            settlement.SerializeToString(),
            f"{settlement.attempt_id}-{copy}",
        )
    txn = f"attempt:{settlement.attempt_id}"

    async def posted() -> int | None:
        count: int = await db.fetchval("SELECT count(*) FROM ledger_entries WHERE txn_id = $1", txn)
        return count or None

    assert await eventually(posted) == 2
    await asyncio.sleep(0.5)  # the other copies have had their batches by now
    assert await posted() == 2
    rows = await db.fetchval(
        "SELECT count(*) FROM task_settlements WHERE attempt_id = $1", settlement.attempt_id
    )
    assert rows == 1


async def test_a_duel_is_posted_once_and_counted_in_the_summary(
    nc: Client, db: asyncpg.Connection
) -> None:
    duel = DuelResult(
        duel_id=uuid.uuid4().hex,
        request_id=uuid.uuid4().hex,
        model="synthetic-small",
        host_a="duelist-a",
        host_b="duelist-b",
        attempt_a="a",
        attempt_b="b",
        outcome=DUEL_VERDICT_B,
        votes=[
            JudgeVote(
                judge_host_id="judge-1",
                verdict_in_order=DUEL_VERDICT_B,
                verdict_swapped=DUEL_VERDICT_B,
            ),
            JudgeVote(
                judge_host_id="judge-2",
                verdict_in_order=DUEL_VERDICT_UNSPECIFIED,
                verdict_swapped=DUEL_VERDICT_UNSPECIFIED,
            ),
        ],
    )
    js = nc.jetstream()
    for copy in range(3):
        await bus.hand_off(
            js, subjects.SETTLEMENT_DUEL, duel.SerializeToString(), f"{duel.duel_id}-{copy}"
        )
    kv = await nc.jetstream().key_value(subjects.LEDGER_BUCKET)

    async def summary_with_duel() -> LedgerSummary | None:
        summary = LedgerSummary.FromString((await kv.get(subjects.LEDGER_SUMMARY_KEY)).value or b"")
        lines = {h.host_id: h for h in summary.hosts}
        return summary if "duelist-b" in lines else None

    summary = await eventually(summary_with_duel)
    await asyncio.sleep(0.5)
    lines = {h.host_id: h for h in summary.hosts}
    assert lines["duelist-b"].duels == lines["duelist-a"].duels == 1
    assert lines["duelist-b"].quality > 0.5 > lines["duelist-a"].quality
    assert lines["duelist-b"].payouts_micros > 0 > lines["duelist-a"].payouts_micros
    assert lines["judge-1"].payouts_micros > 0
    assert "judge-2" not in lines  # gave no verdict: not paid
    # Blocks posted since (delivery re-billings, other tests' settlements, `llooma ledger
    # credit`) move the head on: the summary is republished until it names the head again.

    async def summary_at_head() -> LedgerSummary | None:
        head = await db.fetchval("SELECT block_id FROM ledger_head")
        summary = LedgerSummary.FromString((await kv.get(subjects.LEDGER_SUMMARY_KEY)).value or b"")
        return summary if summary.head_block_id == head else None

    await eventually(summary_at_head)
    count = await db.fetchval(
        "SELECT count(*) FROM ledger_entries WHERE txn_id = $1", f"duel:{duel.duel_id}"
    )
    assert count == 6  # reward, penalty and one judge's fee, two legs each


def llooma(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llooma.cli", "ledger", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_cli_verifies_reports_and_credits(
    stack: Stack, http: httpx.AsyncClient, database_url: str
) -> None:
    common = ["--database-url", database_url]
    assert stack.nats_url is not None
    anchors = ["--nats-url", stack.nats_url, "--seed", stack.control_seed or ""]
    public_key = str(stack.ledger_key_file.with_suffix(".pub"))
    verified = await asyncio.to_thread(
        llooma, "verify", *common, *anchors, "--key-file", public_key
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ledger ok" in verified.stdout
    assert "match their anchors" in verified.stdout
    report = await asyncio.to_thread(llooma, "report", *common)
    assert report.returncode == 0, report.stderr
    assert "cost per successful response" in report.stdout
    assert "host-fast" in report.stdout or "host-steady" in report.stdout
    keyless = await asyncio.to_thread(
        llooma, "credit", NO_BALANCE_KEY, "5", *common, "--key-file", str(stack.root / "no.key")
    )
    # Never a signing key of its own: its blocks would not verify against accounting's.
    assert keyless.returncode == 2, keyless.stdout + keyless.stderr
    assert not (stack.root / "no.key").exists()
    credit = ["credit", NO_BALANCE_KEY, "5", *common, "--key-file", str(stack.ledger_key_file)]
    once = ["--idempotency-key", f"top-up-{uuid.uuid4().hex}"]
    credited = await asyncio.to_thread(llooma, *credit, *once)
    assert credited.returncode == 0, credited.stdout + credited.stderr
    assert "balance 5.000000" in credited.stdout
    again = await asyncio.to_thread(llooma, *credit, *once)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing added" in again.stdout
    assert "balance 5.000000" in again.stdout
    body = {"model": "synthetic-small", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {NO_BALANCE_KEY}"}

    async def admitted() -> int | None:
        response = await http.post("/v1/chat/completions", json=body, headers=headers)
        return response.status_code if response.status_code != 402 else None

    assert await eventually(admitted) == 200
