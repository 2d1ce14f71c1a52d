"""Stake locked in the ledger, and slashing (issue 15), on real Postgres and NATS.

The ledger part posts through `LedgerStore` into a fresh database: stake and unlock postings,
slashes for a no-show streak and a unanimous duel, each once, and the chain still verifies.
The stack part runs a stack of its own with ledger stake alone (no floor): a host announcing
the maximum stake with nothing locked is (almost) never drawn, and a staked host that accepts
and never answers is slashed until its draw share falls; `llooma ledger stake` is idempotent and
`llooma ledger verify` passes after it all."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from fractions import Fraction

import asyncpg
import httpx
import pytest
from nats.aio.client import Client

from llooma import bus, subjects
from llooma.ledger.blocks import Signer
from llooma.ledger.economics import (
    PLATFORM,
    TREASURY,
    Prices,
    SlashRules,
    host_account,
    stake_account,
)
from llooma.ledger.store import LedgerStore, NotEnoughCredits
from llooma.ledger.verify import verify_ledger
from llooma.processes import free_port
from llooma.settings import Settings
from llooma.stack import Stack
from llooma.v1.common_pb2 import Usage
from llooma.v1.duel_pb2 import DUEL_VERDICT_B, DuelResult, JudgeVote
from llooma.v1.host_pb2 import HostChunk, HostFinished, HostTask, HostToken
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_LOST, ATTEMPT_OUTCOME_WON, TaskSettlement
from tests.conftest import AUTH
from tests.stack.test_race import chat, wait_listed
from tests.support.ledger_db import fresh_database, new_database
from tests.support.scripted_host import Reply, ScriptedHost

CREDIT = 1_000_000
RULES = SlashRules(no_show_streak=2, no_show_fraction=Fraction(1, 2), duel_fraction=Fraction(1, 4))


# -- the ledger ------------------------------------------------------------------------------


@pytest.fixture
async def store(database_url: str, tmp_path: object) -> AsyncIterator[LedgerStore]:
    async with fresh_database(database_url) as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            yield LedgerStore(pool, Signer.load_or_create(tmp_path / "k.key"), Prices(), RULES)  # type: ignore[operator]
        finally:
            await pool.close()


async def balance(store: LedgerStore, account: str) -> int:
    value = await store.pool.fetchval(
        "SELECT balance FROM account_balances WHERE account = $1", account
    )
    return int(value or 0)


def attempt(host: str, *, no_show: bool = False, tokens: int = 0) -> TaskSettlement:
    return TaskSettlement(
        attempt_id=uuid.uuid4().hex,
        request_id=uuid.uuid4().hex,
        task_id=uuid.uuid4().hex,
        host_id=host,
        model="m",
        outcome=ATTEMPT_OUTCOME_WON if tokens else ATTEMPT_OUTCOME_LOST,
        usage=Usage(output_tokens=tokens),
        delivered_tokens=tokens,
        finished_unix_nanos=1,
        accepted=True,
        no_show=no_show,
    )


async def test_stake_postings_are_idempotent_slashed_released_and_verify(
    store: LedgerStore,
) -> None:
    first = await store.lock_stake("stake:once", "h", 8 * CREDIT, TREASURY)
    again = await store.lock_stake("stake:once", "h", 8 * CREDIT, TREASURY)
    assert (first.new, again.new) == (1, 0)
    assert first.stakes == {"h": 8 * CREDIT}
    assert await balance(store, stake_account("h")) == 8 * CREDIT
    # A host's own earnings must cover what it locks.
    with pytest.raises(NotEnoughCredits):
        await store.lock_stake("stake:own", "h", 1, host_account("h"))

    # Two no-shows in a row (the rule here) halve the stake; a first token ends a streak.
    await store.settle([attempt("h", no_show=True), attempt("h", tokens=3)])
    await store.settle([attempt("h", no_show=True)])
    assert await balance(store, stake_account("h")) == 8 * CREDIT
    slashed = await store.settle([attempt("h", no_show=True)])
    assert slashed.stakes == {"h": 4 * CREDIT}
    assert await balance(store, stake_account("h")) == 4 * CREDIT
    tally = await store.pool.fetchrow(
        "SELECT no_shows, no_show_streak FROM host_tallies WHERE host_id = 'h'"
    )
    assert tally is not None
    assert tuple(tally) == (3, 0)

    # A duel lost unanimously by two judges costs a quarter of what is left.
    votes = [
        JudgeVote(judge_host_id=j, verdict_in_order=DUEL_VERDICT_B, verdict_swapped=DUEL_VERDICT_B)
        for j in ("j1", "j2")
    ]
    duel = DuelResult(
        duel_id=uuid.uuid4().hex, host_a="h", host_b="g", outcome=DUEL_VERDICT_B, votes=votes
    )
    await store.settle_duels([duel])
    await store.settle_duels([duel])  # redelivered: posts nothing
    assert await balance(store, stake_account("h")) == 3 * CREDIT
    kinds = await store.pool.fetch(
        "SELECT kind, sum(amount) AS total FROM ledger_entries WHERE account = $1 GROUP BY kind",
        PLATFORM,
    )
    by_kind = {r["kind"]: r["total"] for r in kinds}
    assert by_kind["slash:no_show"] == 4 * CREDIT
    assert by_kind["slash:duel"] == CREDIT

    # An unlock waits out its delay (0 here), pays the host, and never more than is locked.
    with pytest.raises(NotEnoughCredits):
        await store.request_unlock("unstake:too-much", "h", 3 * CREDIT + 1, 0.0)
    earned = await balance(store, host_account("h"))  # a token's pay less the duel penalty
    assert await store.request_unlock("unstake:u1", "h", 2 * CREDIT, 0.0)
    assert not await store.request_unlock("unstake:u1", "h", 2 * CREDIT, 0.0)
    with pytest.raises(NotEnoughCredits):  # 2 of the 3 are already asked back
        await store.request_unlock("unstake:u2", "h", 2 * CREDIT, 0.0)
    released = await store.release_unlocks()
    assert released.stakes == {"h": CREDIT}
    assert (await store.release_unlocks()).new == 0
    assert await balance(store, host_account("h")) == earned + 2 * CREDIT
    assert await balance(store, stake_account("h")) == CREDIT

    async with store.pool.acquire() as conn:
        verdict = await verify_ledger(conn, {store.signer.public_key})  # type: ignore[arg-type]
    assert verdict.ok, verdict.reason


# -- a stack with ledger stake alone -----------------------------------------------------------


@pytest.fixture(scope="module")
def stake_stack(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        root=tmp_path_factory.mktemp("stake-stack"),
        http_port=free_port(),
        database_url=new_database(database_url, "stake"),
        hosts=[],
        extra_env={
            "LLOOMA_DUEL_FRACTION": "0",
            "LLOOMA_SLASH_NO_SHOW_STREAK": "2",
            "LLOOMA_SLASH_NO_SHOW_FRACTION": "0.9",
            "LLOOMA_SILENCE_PROBE_FRACTION": "0.5",
        },
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
async def stake_http(stake_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stake_stack.base_url, timeout=30.0) as client:
        yield client


@pytest.fixture
async def stake_nc(stake_stack: Stack) -> AsyncIterator[Client]:
    assert stake_stack.nats_url is not None
    client = await bus.connect(
        stake_stack.nats_url, "llooma-stake-tests", nkey_seed_file=stake_stack.control_seed
    )
    yield client
    await client.close()


def ledger_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    assert stack.database_url is not None
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "llooma.cli",
            "ledger",
            *args,
            "--database-url",
            stack.database_url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "LLOOMA_STAKE_UNLOCK_DELAY_S": "0"},
    )


def stake(stack: Stack, host: str, credits: str, *extra: str) -> subprocess.CompletedProcess[str]:
    key = ["--key-file", str(stack.ledger_key_file)]
    return ledger_cli(stack, "stake", host, credits, *key, *extra)


async def locked_stake(nc: Client, host: str) -> int | None:
    kv = await nc.jetstream().key_value(subjects.STAKES_BUCKET)
    try:
        entry = await kv.get(host)
    except Exception:
        return None
    return int(entry.value) if entry.value else None


async def until_published(nc: Client, host: str, micros: int, *, at_most: bool = False) -> None:
    """Until the host's published stake is `micros` (or, at_most, no more than that)."""
    # Accounting republishes stakes every 2 s; 30 s leaves room for a loaded machine.
    published = None
    for _ in range(300):
        published = await locked_stake(nc, host)
        if published == micros or (at_most and published is not None and published <= micros):
            await asyncio.sleep(0.3)  # the dispatcher's watch follows the bucket
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{host}'s stake of {micros} never published (last: {published})")


async def answer(_: HostTask, reply: Reply) -> None:
    await reply(HostChunk(seq=1, token=HostToken(text="ok")))
    await reply(
        HostChunk(seq=2, finished=HostFinished(finish_reason="stop", usage=Usage(output_tokens=1)))
    )


async def mute(_: HostTask, reply: Reply) -> None:
    return None  # it accepted (ScriptedHost sends that) and never sends a token


async def test_a_host_announcing_the_maximum_stake_with_none_locked_is_not_drawn(
    stake_stack: Stack, stake_http: httpx.AsyncClient, stake_nc: Client
) -> None:
    model = f"greedy-{uuid.uuid4().hex[:6]}"
    honest = [f"honest-{i}-{model}" for i in (1, 2)]
    once = ["--idempotency-key", f"stake-{model}"]
    for host in honest:
        staked = await asyncio.to_thread(stake, stake_stack, host, "10", *once)
        assert staked.returncode == 0, staked.stdout + staked.stderr
        assert "its stake 10.000000" in staked.stdout
    again = await asyncio.to_thread(stake, stake_stack, honest[0], "10", *once)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing locked" in again.stdout
    assert "stake 10.000000" in again.stdout
    broke = await asyncio.to_thread(stake, stake_stack, honest[0], "1", "--from", "host")
    assert broke.returncode == 1, broke.stdout + broke.stderr
    for host in honest:
        await until_published(stake_nc, host, 10 * CREDIT)

    async with (
        ScriptedHost(stake_nc, f"greedy-{model}", model, answer, stake=1000.0) as greedy,
        ScriptedHost(stake_nc, honest[0], model, answer, stake=1000.0) as one,
        ScriptedHost(stake_nc, honest[1], model, answer, stake=1000.0) as two,
    ):
        await wait_listed(stake_http, model, hosts=3)
        requests = 30
        for _ in range(requests):
            response = await stake_http.post("/v1/chat/completions", json=chat(model), headers=AUTH)
            assert response.status_code == 200, (response.text, dict(response.headers))
    # Width 2 of three: the greedy host's weight is the draw's floor (1e-3) against 10 and 10.
    assert len(greedy.received) <= 1
    assert len(one.received) + len(two.received) >= 2 * requests - 1


async def slashes(stack: Stack, host: str, kind: str = "slash:no_show") -> int:
    """Slashes of `kind` posted against the host's stake (`slash:%`: of any kind)."""
    assert stack.database_url is not None
    conn = await asyncpg.connect(stack.database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE account = $1 AND kind LIKE $2",
            stake_account(host),
            kind,
        )
        return count
    finally:
        await conn.close()


async def fetch(stack: Stack, query: str, *args: object) -> list[asyncpg.Record]:
    assert stack.database_url is not None
    conn = await asyncpg.connect(stack.database_url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def until_settled(stack: Stack, host: str, attempts: int) -> list[asyncpg.Record]:
    """The host's settled attempts, once there are `attempts` of them."""
    query = "SELECT * FROM task_settlements WHERE host_id = $1"
    for _ in range(150):
        rows = await fetch(stack, query, host)
        if len(rows) >= attempts:
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"{host}: {len(rows)} of {attempts} attempts settled")


def verify(stack: Stack) -> subprocess.CompletedProcess[str]:
    return ledger_cli(
        stack,
        "verify",
        "--nats-url",
        stack.nats_url or "",
        "--seed",
        stack.control_seed or "",
        "--key-file",
        str(stack.ledger_key_file.with_suffix(".pub")),
    )


async def test_a_staked_host_that_accepts_and_never_answers_is_slashed_and_drawn_less(
    stake_stack: Stack, stake_http: httpx.AsyncClient, stake_nc: Client
) -> None:
    model = f"lazy-{uuid.uuid4().hex[:6]}"
    lazy_id = f"lazy-{model}"
    hosts = [lazy_id, f"honest-a-{model}", f"honest-b-{model}"]
    for host in hosts:
        staked = await asyncio.to_thread(stake, stake_stack, host, "10")
        assert staked.returncode == 0, staked.stdout + staked.stderr
    for host in hosts:
        await until_published(stake_nc, host, 10 * CREDIT)
    # Width 1 and a short deadline: a race the lazy host is drawn into reaches the deadline
    # (a no-show), and a fallback answers.
    headers = {**AUTH, "x-llooma-race-width": "1", "x-llooma-first-token-deadline-ms": "300"}

    async def ask() -> None:
        response = await stake_http.post("/v1/chat/completions", json=chat(model), headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "ok"

    async with (
        ScriptedHost(stake_nc, lazy_id, model, mute, stake=1000.0, accept=True) as lazy,
        ScriptedHost(stake_nc, hosts[1], model, answer, stake=1000.0),
        ScriptedHost(stake_nc, hosts[2], model, answer, stake=1000.0),
    ):
        await wait_listed(stake_http, model, hosts=3)
        # Two streaks of two no-shows: the first at a third of the draws, the second at 1/21
        # (its stake is 1 credit then): ~50 requests expected, 200 allowed.
        before = 0
        while before < 200 and await slashes(stake_stack, lazy_id) < 2:
            await ask()
            before += 1
        assert await slashes(stake_stack, lazy_id) >= 2, f"not slashed twice in {before} requests"
        drawn_before = len(lazy.received)
        # Two slashes of 90 %: 0.1 of 10 credits left against 10 and 10.
        await until_published(stake_nc, lazy_id, CREDIT // 10)
        after = 30
        for _ in range(after):
            await ask()
        drawn_after = len(lazy.received) - drawn_before
    assert drawn_before >= 4  # two streaks of two
    # At 0.1 credits against 10 and 10: 0.15 draws expected in 30 (10 at an equal stake).
    assert drawn_after <= 2, f"drawn {drawn_after} of {after} after its stake fell to 0.1"
    verified = await asyncio.to_thread(verify, stake_stack)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ledger ok" in verified.stdout
    # Paid nothing for accepting: no host account, or nothing in it but what it had.
    assert stake_stack.database_url is not None
    conn = await asyncpg.connect(stake_stack.database_url)
    try:
        paid = await conn.fetchval(
            "SELECT balance FROM account_balances WHERE account = $1", host_account(lazy_id)
        )
    finally:
        await conn.close()
    assert not paid


async def stake_all(stack: Stack, nc: Client, hosts: list[str]) -> None:
    for host in hosts:
        staked = await asyncio.to_thread(stake, stack, host, "10")
        assert staked.returncode == 0, staked.stdout + staked.stderr
    for host in hosts:
        await until_published(nc, host, 10 * CREDIT)


async def test_a_silent_staker_that_only_ever_loses_is_slashed_through_probes_and_drawn_less(
    stake_stack: Stack, stake_http: httpx.AsyncClient, stake_nc: Client
) -> None:
    model = f"quiet-{uuid.uuid4().hex[:6]}"
    quiet_id = f"quiet-{model}"
    hosts = [quiet_id, f"fast-a-{model}", f"fast-b-{model}"]
    await stake_all(stake_stack, stake_nc, hosts)
    # Width 2: whenever the silent host is drawn, a fast host answers long before the deadline,
    # so no race ever reaches it; only a probe (half its losses here) sees the silence.
    headers = {**AUTH, "x-llooma-race-width": "2", "x-llooma-first-token-deadline-ms": "300"}

    async def ask() -> None:
        response = await stake_http.post("/v1/chat/completions", json=chat(model), headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "ok"

    async with (
        ScriptedHost(stake_nc, quiet_id, model, mute, stake=1000.0, accept=True) as quiet,
        ScriptedHost(stake_nc, hosts[1], model, answer, stake=1000.0),
        ScriptedHost(stake_nc, hosts[2], model, answer, stake=1000.0),
    ):
        await wait_listed(stake_http, model, hosts=3)
        # Drawn in 2/3 of races, probed in half: a no-show every 3 races, a slash every 6 at
        # first, then every ~27 (a tenth of the stake left): ~40 races expected, 150 allowed.
        before = 0
        while before < 150 and await slashes(stake_stack, quiet_id) < 2:
            await ask()
            before += 1
        assert await slashes(stake_stack, quiet_id) >= 2, f"not slashed twice in {before} races"
        drawn_before = len(quiet.received)
        # A tenth at most: a no-show still being settled may complete a third streak.
        await until_published(stake_nc, quiet_id, CREDIT // 10, at_most=True)
        after = 30
        for _ in range(after):
            await ask()
        drawn_after = len(quiet.received) - drawn_before
    print(
        f"\nsilent staker: slashed twice after {before} races (drawn in {drawn_before}), "
        f"then drawn in {drawn_after} of {after}"
    )
    assert drawn_before >= 4
    # 0.1 credits against 10 and 10, two of three drawn: ~0.45 draws expected in 30 (20 at an
    # equal stake).
    assert drawn_after <= 3, f"drawn {drawn_after} of {after} after its stake fell to 0.1"
    rows = await fetch(stake_stack, "SELECT * FROM host_tallies WHERE host_id = $1", quiet_id)
    assert rows[0]["no_shows"] >= 4
    paid = await fetch(
        stake_stack,
        "SELECT balance FROM account_balances WHERE account = $1",
        host_account(quiet_id),
    )
    assert not paid or not paid[0]["balance"]  # no reservation fee without a token
    verified = await asyncio.to_thread(verify, stake_stack)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ledger ok" in verified.stdout


async def test_an_honest_slow_host_that_always_loses_is_never_slashed(
    stake_stack: Stack, stake_http: httpx.AsyncClient, stake_nc: Client
) -> None:
    model = f"slow-{uuid.uuid4().hex[:6]}"
    slow_id, fast_id = f"slow-{model}", f"fast-{model}"
    await stake_all(stake_stack, stake_nc, [slow_id, fast_id])
    headers = {**AUTH, "x-llooma-race-width": "2", "x-llooma-first-token-deadline-ms": "1000"}

    async def slowly(task: HostTask, reply: Reply) -> None:
        await asyncio.sleep(0.15)  # the host's pace: its first token well inside the deadline
        await answer(task, reply)

    requests = 30
    async with (
        ScriptedHost(stake_nc, slow_id, model, slowly, stake=1000.0, accept=True) as slow,
        ScriptedHost(stake_nc, fast_id, model, answer, stake=1000.0, accept=True),
    ):
        await wait_listed(stake_http, model, hosts=2)
        for _ in range(requests):
            response = await stake_http.post(
                "/v1/chat/completions", json=chat(model), headers=headers
            )
            assert response.status_code == 200, response.text
        assert len(slow.received) == requests
        settled = await until_settled(stake_stack, slow_id, requests)
    assert {row["outcome"] for row in settled} == {"lost"}
    # Probed in about half its races: kept running to its first token, which came in time.
    probed = [row for row in settled if row["first_token_ms"] >= 100]
    ms = sorted(row["first_token_ms"] for row in probed)
    print(f"\nslow honest host: {len(probed)} of {requests} losses probed, first token {ms} ms")
    assert len(probed) >= 3, f"only {len(probed)} of {requests} losses probed"
    assert await slashes(stake_stack, slow_id, "slash:%") == 0
    rows = await fetch(stake_stack, "SELECT * FROM host_tallies WHERE host_id = $1", slow_id)
    assert rows[0]["no_shows"] == 0
    assert rows[0]["no_show_streak"] == 0


async def test_a_host_inflating_its_usage_is_slashed_and_billed_on_the_counted_tokens(
    stake_stack: Stack, stake_http: httpx.AsyncClient, stake_nc: Client
) -> None:
    model = f"inflate-{uuid.uuid4().hex[:6]}"
    liar_id = f"liar-{model}"
    await stake_all(stake_stack, stake_nc, [liar_id])
    claimed = Usage(input_tokens=5, output_tokens=5000)

    async def inflate(_: HostTask, reply: Reply) -> None:
        await reply(HostChunk(seq=1, token=HostToken(text="ok")))
        await reply(HostChunk(seq=2, finished=HostFinished(finish_reason="stop", usage=claimed)))

    requests = 3
    async with ScriptedHost(stake_nc, liar_id, model, inflate, stake=1000.0, accept=True):
        await wait_listed(stake_http, model, hosts=1)
        for _ in range(requests):
            response = await stake_http.post("/v1/chat/completions", json=chat(model), headers=AUTH)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 1
        settled = await until_settled(stake_stack, liar_id, requests)
    assert [(r["input_tokens"], r["output_tokens"]) for r in settled] == [(5, 1)] * requests
    # A slash per lie, each a fiftieth of what the last left.
    left = 10 * CREDIT
    for _ in range(requests):
        left -= left // 50
    await until_published(stake_nc, liar_id, left)
    assert await slashes(stake_stack, liar_id, "slash:usage") == requests
    settings = Settings()
    attempts = [row["attempt_id"] for row in settled]
    legs = await fetch(
        stake_stack,
        "SELECT account, amount, kind FROM ledger_entries WHERE ref = ANY($1::text[])",
        attempts,
    )
    charged = sum(-leg["amount"] for leg in legs if leg["kind"] == "charge" and leg["amount"] < 0)
    paid = sum(leg["amount"] for leg in legs if leg["kind"] == "payout" and leg["amount"] > 0)
    assert charged == requests * settings.user_price_micros * (5 + 1)
    assert paid == requests * settings.host_price_micros * 1
    verified = await asyncio.to_thread(verify, stake_stack)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ledger ok" in verified.stdout
