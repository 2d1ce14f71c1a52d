"""The ledger on a real Postgres: economics, append-only double entry, idempotent settlement,
and tamper evidence (every single-row change, deletion, insertion or move is caught)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import asyncpg
import pytest

from llooma.db.migrate import migration_files
from llooma.ledger.blocks import Signer, public_key_path, trusted_key
from llooma.ledger.economics import (
    FALLBACK,
    PLATFORM,
    Prices,
    account_deltas,
    deposit,
    host_account,
    settle_attempt,
    settle_duel,
    user_account,
)
from llooma.ledger.store import LedgerStore, quality, read_summary
from llooma.ledger.verify import verify_ledger
from llooma.v1.common_pb2 import Usage
from llooma.v1.duel_pb2 import (
    DUEL_VERDICT_A,
    DUEL_VERDICT_B,
    DUEL_VERDICT_TIE,
    DUEL_VERDICT_UNSPECIFIED,
    DuelResult,
    JudgeVote,
)
from llooma.v1.settlement_pb2 import (
    ATTEMPT_OUTCOME_FAILED,
    ATTEMPT_OUTCOME_LOST,
    ATTEMPT_OUTCOME_WON,
    TaskSettlement,
)
from tests.support.ledger_db import fresh_database

PRICES = Prices(
    user=7,
    host=11,
    reservation_fee=40,
    progress_fee=3,
    eta=Fraction(3, 20),
    fallback=29,
    duel_reward=500,
    duel_penalty=300,
    judge_fee=100,
    host_by_model={"big": 50},
)


def settlement(
    outcome: int,
    tokens: int,
    *,
    host: str = "h1",
    winner_tokens: int = 0,
    winner_model: str = "",
    fallback: bool = False,
    winner_fallback: bool = False,
    key_id: str = "k1",
    input_tokens: int = 0,
    model: str = "m",
    accepted: bool = True,
    delivered: int = 0,
    violations: int = 0,
    requested_model: str = "",
) -> TaskSettlement:
    return TaskSettlement(
        attempt_id=uuid.uuid4().hex,
        request_id=uuid.uuid4().hex,
        task_id=uuid.uuid4().hex,
        host_id=host,
        model=model,
        outcome=outcome,  # type: ignore[arg-type]
        usage=Usage(input_tokens=input_tokens, output_tokens=tokens),
        api_key_id=key_id,
        fallback=fallback,
        winner_model=winner_model,
        winner_output_tokens=winner_tokens,
        winner_fallback=winner_fallback,
        finished_unix_nanos=1,
        accepted=accepted,
        delivered_tokens=delivered,
        violations=violations,
        requested_model=requested_model,
    )


# -- economics (pure) ----------------------------------------------------------------------


def test_winner_is_paid_per_output_token_and_the_user_charged_per_token() -> None:
    won = settlement(ATTEMPT_OUTCOME_WON, 100, model="big", input_tokens=30)
    deltas = account_deltas([settle_attempt(PRICES, won)])
    assert deltas[host_account("h1")] == 50 * 100
    assert deltas[user_account("k1")] == -7 * 130
    assert deltas[PLATFORM] == 7 * 130 - 50 * 100


def test_loser_fee_is_reservation_plus_progress_capped_at_eta_of_the_winner() -> None:
    # Uncapped: 40 + 3 * 10 = 70 <= 0.15 * 11 * 1000 = 1650.
    small = settlement(ATTEMPT_OUTCOME_LOST, 10, winner_tokens=1000, winner_model="m")
    assert account_deltas([settle_attempt(PRICES, small)])[host_account("h1")] == 70
    # Capped: 40 + 3 * 90 = 310 > 0.15 * 11 * 100 = 165.
    capped = settlement(ATTEMPT_OUTCOME_LOST, 90, winner_tokens=100, winner_model="m")
    assert account_deltas([settle_attempt(PRICES, capped)])[host_account("h1")] == 165
    # The cap follows the winner's price: a "big" winner pays 50 per token.
    big = settlement(ATTEMPT_OUTCOME_LOST, 90, winner_tokens=100, winner_model="big")
    assert account_deltas([settle_attempt(PRICES, big)])[host_account("h1")] == 310


def test_failed_hosts_get_no_reservation_fee_and_nobody_is_paid_without_a_winner() -> None:
    failed = settlement(ATTEMPT_OUTCOME_FAILED, 10, winner_tokens=1000, winner_model="m")
    assert account_deltas([settle_attempt(PRICES, failed)])[host_account("h1")] == 30
    orphan = settlement(ATTEMPT_OUTCOME_LOST, 10)
    assert settle_attempt(PRICES, orphan).legs == ()


def test_a_winner_is_paid_and_charged_for_no_more_tokens_than_were_delivered() -> None:
    claimed = settlement(ATTEMPT_OUTCOME_WON, 100, input_tokens=30, delivered=60)
    deltas = account_deltas([settle_attempt(PRICES, claimed)])
    assert deltas[host_account("h1")] == 11 * 60
    assert deltas[user_account("k1")] == -7 * (30 + 60)
    honest = settlement(ATTEMPT_OUTCOME_WON, 40, delivered=60)
    assert account_deltas([settle_attempt(PRICES, honest)])[host_account("h1")] == 11 * 40


def test_the_reservation_fee_needs_an_accepted_attempt_without_violations() -> None:
    # Progress only: 3 * 10 = 30 (with the reservation it would be 70, under the cap).
    for loser in (
        settlement(ATTEMPT_OUTCOME_LOST, 10, winner_tokens=1000, winner_model="m", accepted=False),
        settlement(ATTEMPT_OUTCOME_LOST, 10, winner_tokens=1000, winner_model="m", violations=2),
    ):
        assert account_deltas([settle_attempt(PRICES, loser)])[host_account("h1")] == 30


def test_no_reservation_fee_for_an_attempt_that_produced_no_token() -> None:
    lazy = settlement(ATTEMPT_OUTCOME_LOST, 0, winner_tokens=1000, winner_model="m")
    assert lazy.accepted
    assert settle_attempt(PRICES, lazy).legs == ()
    one = settlement(ATTEMPT_OUTCOME_LOST, 1, winner_tokens=1000, winner_model="m")
    assert account_deltas([settle_attempt(PRICES, one)])[host_account("h1")] == 40 + 3


def test_fallback_is_priced_apart_and_booked_as_its_own_cost() -> None:
    won = settlement(ATTEMPT_OUTCOME_WON, 100, fallback=True)
    deltas = account_deltas([settle_attempt(PRICES, won)])
    assert deltas[FALLBACK] == 29 * 100
    assert host_account("h1") not in deltas
    # A racer that lost to the fallback is capped by the fallback's payout.
    loser = settlement(
        ATTEMPT_OUTCOME_LOST, 200, winner_tokens=100, winner_model="m", winner_fallback=True
    )
    assert account_deltas([settle_attempt(PRICES, loser)])[host_account("h1")] == 435


def test_a_pool_host_continuing_a_stream_is_paid_as_the_fallback_not_at_its_model_price() -> None:
    # The racer marks fallback=True for any attempt on a pool host, a continuation included.
    continued = settlement(ATTEMPT_OUTCOME_WON, 100, host="pool", model="big", fallback=True)
    deltas = account_deltas([settle_attempt(PRICES, continued)])
    assert deltas[FALLBACK] == 29 * 100
    assert host_account("pool") not in deltas
    on_a_host = settlement(ATTEMPT_OUTCOME_WON, 100, host="pool", model="big")
    assert account_deltas([settle_attempt(PRICES, on_a_host)])[host_account("pool")] == 50 * 100


def test_the_user_pays_the_asked_for_model_and_the_host_is_paid_for_the_serving_one() -> None:
    prices = replace(PRICES, user_by_model={"asked": 13, "big": 90})
    won = settlement(
        ATTEMPT_OUTCOME_WON, 100, model="big", requested_model="asked", input_tokens=20
    )
    deltas = account_deltas([settle_attempt(prices, won)])
    assert deltas[user_account("k1")] == -13 * 120
    assert deltas[host_account("h1")] == 50 * 100
    # An older settlement without the requested model is charged at the serving model's price.
    legacy = settlement(ATTEMPT_OUTCOME_WON, 100, model="big", input_tokens=20)
    assert account_deltas([settle_attempt(prices, legacy)])[user_account("k1")] == -90 * 120


def duel(outcome: int, votes: Sequence[tuple[str, int, int]]) -> DuelResult:
    return DuelResult(
        duel_id=uuid.uuid4().hex,
        request_id="r",
        model="m",
        host_a="a",
        host_b="b",
        outcome=outcome,  # type: ignore[arg-type]
        votes=[
            JudgeVote(judge_host_id=j, verdict_in_order=x, verdict_swapped=y)  # type: ignore[arg-type]
            for j, x, y in votes
        ],
    )


def test_duel_rewards_the_winner_penalizes_the_loser_and_pays_judges_who_voted() -> None:
    votes = [
        ("j1", DUEL_VERDICT_B, DUEL_VERDICT_B),
        ("j2", DUEL_VERDICT_B, DUEL_VERDICT_TIE),
        ("j3", DUEL_VERDICT_UNSPECIFIED, DUEL_VERDICT_UNSPECIFIED),
    ]
    deltas = account_deltas([settle_duel(PRICES, duel(DUEL_VERDICT_B, votes))])
    assert deltas[host_account("b")] == 500
    assert deltas[host_account("a")] == -300
    assert deltas[host_account("j1")] == deltas[host_account("j2")] == 100
    assert host_account("j3") not in deltas
    tie = account_deltas([settle_duel(PRICES, duel(DUEL_VERDICT_TIE, votes))])
    assert host_account("a") not in tie
    assert host_account("b") not in tie
    assert sum(tie.values()) == 0


# -- the database ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def dsn(database_url: str) -> AsyncIterator[str]:
    async with fresh_database(database_url) as url:
        yield url


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Signer:
    return Signer.load_or_create(tmp_path_factory.mktemp("ledger-key") / "ledger.key")


@pytest.fixture(scope="module")
async def store(dsn: str, signer: Signer) -> AsyncIterator[LedgerStore]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=16)
    yield LedgerStore(pool, signer, PRICES)
    await pool.close()


async def test_entries_are_append_only_and_every_transaction_sums_to_zero(
    store: LedgerStore,
) -> None:
    await store.settle([settlement(ATTEMPT_OUTCOME_WON, 5)])
    async with store.pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE ledger_entries SET amount = amount + 1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM ledger_entries")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM ledger_blocks")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("TRUNCATE ledger_entries CASCADE")
        with pytest.raises(asyncpg.CheckViolationError, match="does not sum to zero"):
            await conn.execute(
                "INSERT INTO ledger_entries SELECT height, 99, 'forged', 0, 'host:x', 5, "
                "'payout', 'x' FROM ledger_head"
            )
        unbalanced = await conn.fetchval(
            "SELECT count(*) FROM (SELECT txn_id FROM ledger_entries GROUP BY txn_id "
            "HAVING sum(amount) <> 0) AS t"
        )
        assert unbalanced == 0


async def test_64_concurrent_duplicate_settlements_post_exactly_once(store: LedgerStore) -> None:
    won = settlement(ATTEMPT_OUTCOME_WON, 40, key_id="concurrent")
    blocks_before = await store.pool.fetchval("SELECT count(*) FROM ledger_blocks")
    results = await asyncio.gather(*(store.settle([won]) for _ in range(64)))
    assert sum(r.new for r in results) == 1
    assert sum(r.block is not None for r in results) == 1
    rows = await store.pool.fetch(
        "SELECT account, amount FROM ledger_entries WHERE txn_id = $1", f"attempt:{won.attempt_id}"
    )
    assert {r["account"]: r["amount"] for r in rows}[user_account("concurrent")] == -7 * 40
    assert len(rows) == len(settle_attempt(PRICES, won).legs)
    assert await store.pool.fetchval("SELECT count(*) FROM ledger_blocks") == blocks_before + 1
    balance = await store.pool.fetchval(
        "SELECT balance FROM account_balances WHERE account = $1", user_account("concurrent")
    )
    assert balance == -7 * 40


async def test_five_redeliveries_post_once_and_a_batch_with_duplicates_too(
    store: LedgerStore,
) -> None:
    lost = settlement(ATTEMPT_OUTCOME_LOST, 3, host="redelivered", winner_tokens=50)
    posted = [await store.settle([lost]) for _ in range(5)]
    assert [p.new for p in posted] == [1, 0, 0, 0, 0]
    again = settlement(ATTEMPT_OUTCOME_WON, 9, host="redelivered")
    assert (await store.settle([again, again, lost, again])).new == 1
    summary = await read_summary(store.pool)
    line = next(h for h in summary.hosts if h.host_id == "redelivered")
    assert (line.race_wins, line.race_losses) == (1, 1)
    assert line.payouts_micros == 11 * 9 + 40 + 3 * 3


async def test_duels_post_once_and_count_into_host_quality(store: LedgerStore) -> None:
    judged = duel(DUEL_VERDICT_A, [("j1", DUEL_VERDICT_A, DUEL_VERDICT_A)])
    judged.host_a, judged.host_b = "duel-a", "duel-b"
    for _ in range(3):
        await store.settle_duels([judged])
    summary = await read_summary(store.pool)
    lines = {h.host_id: h for h in summary.hosts}
    assert lines["duel-a"].duels == lines["duel-b"].duels == 1
    assert lines["duel-a"].quality == quality(1, 1, 0) > 0.5 > lines["duel-b"].quality
    assert lines["duel-a"].payouts_micros == 500
    assert lines["duel-b"].payouts_micros == -300


async def test_cost_per_successful_response_sums_charges_payouts_and_fallback(
    dsn: str, signer: Signer
) -> None:
    async with fresh_database(dsn) as own:
        pool = await asyncpg.create_pool(own, min_size=1, max_size=2)
        try:
            store = LedgerStore(pool, signer, PRICES)
            winner = settlement(ATTEMPT_OUTCOME_WON, 100, input_tokens=20)
            loser = settlement(
                ATTEMPT_OUTCOME_LOST, 10, host="h2", winner_tokens=100, winner_model="m"
            )
            rescued = settlement(ATTEMPT_OUTCOME_WON, 50, fallback=True)
            failed_alone = settlement(ATTEMPT_OUTCOME_FAILED, 4)
            await store.settle([winner, loser, rescued, failed_alone])
            summary = await read_summary(pool)
            charges = 7 * 120 + 7 * 50
            payouts = 11 * 100 + (40 + 3 * 10)
            assert summary.completed_responses == 2
            assert summary.user_charges_micros == charges
            assert summary.host_payouts_micros == payouts
            assert summary.fallback_cost_micros == 29 * 50
            assert summary.cost_per_successful_response_micros == (
                (charges + payouts + 29 * 50) / 2
            )
        finally:
            await pool.close()


async def test_ledger_totals_are_the_charges_posted_not_priced_again(
    dsn: str, signer: Signer
) -> None:
    """Asked for `asked` (20 a token), served by `served` (25), 100 output tokens claimed but
    90 delivered: the posting charges 20 x (10 + 90) = 2,000; pricing the settlement again
    with the serving model on everything claimed would say 25 x 110 = 2,750."""
    prices = replace(PRICES, user_by_model={"asked": 20, "served": 25})
    won = settlement(
        ATTEMPT_OUTCOME_WON,
        100,
        model="served",
        requested_model="asked",
        input_tokens=10,
        delivered=90,
    )
    legs = settle_attempt(prices, won).legs
    charge = next(leg for leg in legs if leg.kind == "charge" and leg.account == PLATFORM)
    assert charge.amount == 20 * (10 + 90) != prices.user_charge("served", 10 + 100)
    async with fresh_database(dsn) as own:
        pool = await asyncpg.create_pool(own, min_size=1, max_size=2)
        try:
            store = LedgerStore(pool, signer, prices)
            posted = await store.settle([won])
            summary = await read_summary(pool)
            assert summary.user_charges_micros == charge.amount == 2000
            assert posted.user_balances == {"k1": -2000}
            charged = await pool.fetchval(
                "SELECT sum(amount) FROM ledger_entries WHERE kind = 'charge' AND amount > 0"
            )
            assert charged == summary.user_charges_micros
            # A ledger tallied before 0004 (priced again): the migration sums the entries.
            await pool.execute("UPDATE ledger_totals SET user_charges_micros = 2750")
            await pool.execute(dict(migration_files())["0004_charges_from_entries"])
            assert (await read_summary(pool)).user_charges_micros == 2000
        finally:
            await pool.close()


# -- tamper evidence -------------------------------------------------------------------------

Tamper = Callable[[asyncpg.Connection], Awaitable[object]]


def entry_tampers(height: int, seq: int, last_seq: int) -> dict[str, Tamper]:
    where = f"block_height = {height} AND seq = {seq}"

    def update(assignment: str) -> Tamper:
        return lambda c: c.execute(f"UPDATE ledger_entries SET {assignment} WHERE {where}")

    return {
        "amount": update("amount = amount + 1"),
        "account": update("account = 'host:mallory'"),
        "txn": update("txn_id = txn_id || 'x'"),
        "leg": update("leg = leg + 10"),
        "kind": update("kind = 'payout2'"),
        "ref": update("ref = ref || 'x'"),
        "delete": lambda c: c.execute(f"DELETE FROM ledger_entries WHERE {where}"),
        "move to the end": update(f"seq = {last_seq + 1}"),
        "move to the next block": update("block_height = block_height + 1, seq = seq + 1000"),
        "duplicate": lambda c: c.execute(
            f"INSERT INTO ledger_entries SELECT block_height, {last_seq + 1}, txn_id || 'copy', "
            f"leg, account, amount, kind, ref FROM ledger_entries WHERE {where}"
        ),
        "insert at a new height": lambda c: c.execute(
            "INSERT INTO ledger_entries SELECT block_height + 100, 0, txn_id || 'x', leg, "
            f"account, amount, kind, ref FROM ledger_entries WHERE {where}"
        ),
    }


def block_tampers(height: int, top: int) -> dict[str, Tamper]:
    where = f"height = {height}"

    def update(assignment: str) -> Tamper:
        return lambda c: c.execute(f"UPDATE ledger_blocks SET {assignment} WHERE {where}")

    return {
        "block id": update("block_id = md5(block_id) || md5(block_id)"),
        "parent": update("parent_id = md5(parent_id) || md5(parent_id)"),
        "timestamp": update("created_unix_nanos = created_unix_nanos + 1"),
        "proposer": update("proposer = md5(proposer) || md5(proposer)"),
        "count": update("entry_count = entry_count + 1"),
        "root": update("entries_root = md5(entries_root) || md5(entries_root)"),
        "signature": update("signature = md5(signature) || md5(signature) || md5(signature)"),
        "delete": lambda c: c.execute(f"DELETE FROM ledger_blocks WHERE {where}"),
        "move": update(f"height = {top + 50}"),
        "insert a copy on top": lambda c: c.execute(
            f"INSERT INTO ledger_blocks SELECT {top + 1}, md5(block_id) || md5(block_id), "
            "block_id, created_unix_nanos + 1, proposer, entry_count, entries_root, signature "
            f"FROM ledger_blocks WHERE {where}"
        ),
    }


def bookkeeping_tampers() -> list[tuple[str, int, Tamper]]:
    """The chain's head row and the derived balances: outside the blocks, still checked."""

    def run(sql: str) -> Tamper:
        return lambda c: c.execute(sql)

    return [
        ("head: height", 0, run("UPDATE ledger_head SET height = height - 1")),
        ("head: block id", 0, run("UPDATE ledger_head SET block_id = md5(block_id)")),
        (
            "balances: change",
            0,
            run("UPDATE account_balances SET balance = balance + 1 WHERE account = 'user:k1'"),
        ),
        ("balances: delete", 0, run("DELETE FROM account_balances WHERE account = 'host:h2'")),
        ("balances: insert", 0, run("INSERT INTO account_balances VALUES ('user:mallory', 5)")),
    ]


async def test_verify_catches_every_single_row_tamper(dsn: str, tmp_path: Path) -> None:
    signer = Signer.load_or_create(tmp_path / "ledger.key")
    async with fresh_database(dsn) as own:
        pool = await asyncpg.create_pool(own, min_size=1, max_size=2)
        store = LedgerStore(pool, signer, PRICES)
        await store.deposit([deposit("open:k1", "k1", 10_000)])
        for round_ in range(3):
            await store.settle(
                [
                    settlement(ATTEMPT_OUTCOME_WON, 10 + round_, input_tokens=3),
                    settlement(ATTEMPT_OUTCOME_LOST, 2, host="h2", winner_tokens=10),
                ]
            )
        await pool.close()
        # What `llooma ledger verify` trusts: the public key written beside the seed.
        trusted = {trusted_key(public_key_path(tmp_path / "ledger.key"))}
        assert trusted == {signer.public_key}
        conn = await asyncpg.connect(own)
        try:
            clean = await verify_ledger(conn, trusted)
            assert clean.ok, clean.reason
            top = clean.blocks
            entries = await conn.fetch(
                "SELECT block_height, seq, max(seq) OVER (PARTITION BY block_height) AS last "
                "FROM ledger_entries ORDER BY 1, 2"
            )
            cases: list[tuple[str, int, Tamper]] = []
            for row in entries:
                height, seq = row["block_height"], row["seq"]
                for name, tamper in entry_tampers(height, seq, row["last"]).items():
                    cases.append((f"entry {height}/{seq}: {name}", height, tamper))
            for height in range(1, top + 1):
                for name, tamper in block_tampers(height, top).items():
                    cases.append((f"block {height}: {name}", height, tamper))
            chained = len(cases)
            missed = []
            for index, (label, height, tamper) in enumerate([*cases, *bookkeeping_tampers()]):
                tx = conn.transaction(isolation="repeatable_read")
                await tx.start()
                try:
                    # As a superuser would: with triggers (append-only, foreign keys) off.
                    await conn.execute("SET LOCAL session_replication_role = replica")
                    await tamper(conn)
                    verdict = await verify_ledger(conn, trusted)
                finally:
                    await tx.rollback()
                if verdict.ok:
                    missed.append(label)
                elif index < chained:
                    # Named at the tampered block, or at the next one whose link it broke.
                    assert verdict.bad_height in (height, height + 1, height + 100, top + 1), (
                        label,
                        verdict,
                    )
                elif label.startswith("head"):
                    assert verdict.bad_height == top + 1, (label, verdict)
                    assert "head" in verdict.reason, (label, verdict)
                else:
                    assert verdict.bad_height is None, (label, verdict)
                    assert "balance of" in verdict.reason, (label, verdict)
            assert not missed, missed
            assert len(cases) > 100
            assert (await verify_ledger(conn, trusted)).ok
            stranger = Signer.load_or_create(tmp_path / "stranger.key")
            assert not (await verify_ledger(conn, {stranger.public_key})).ok
        finally:
            await conn.close()
