"""What a signing key or the database alone cannot hide: every block's height and id is
anchored in a JetStream stream outside the database, so re-sealing a changed block with the
real key, cutting blocks off the end and rewriting the chain from its first block are all
caught by verify (`llooma ledger verify` too, on a forged database); and the report's tables
outside the chain (host tallies, totals, completed requests, settlements) are re-derived, so
editing them is caught too."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
from nats.aio.client import Client
from nats.js.api import DiscardPolicy
from nats.js.errors import APIError

from llooma import bus, subjects
from llooma.ledger.anchors import Anchorer, read_anchors
from llooma.ledger.blocks import GENESIS_ID, Entry, Signer, public_key_path
from llooma.ledger.economics import deposit
from llooma.ledger.store import LedgerStore
from llooma.ledger.verify import Verdict, verify_ledger
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_LOST, ATTEMPT_OUTCOME_WON
from tests.stack.test_billing import llooma
from tests.stack.test_ledger import PRICES, settlement
from tests.support.ledger_db import fresh_database


@pytest.fixture
async def ledger(
    database_url: str, nc: Client, tmp_path: Path
) -> AsyncIterator[tuple[str, Signer, dict[int, str]]]:
    """A chain of 4 blocks of its own, anchored; yields its database, key and anchors."""
    signer = Signer.load_or_create(tmp_path / "accounting" / "ledger.key")
    async with fresh_database(database_url) as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
        try:
            store = LedgerStore(pool, signer, PRICES)
            await store.deposit([deposit("open:k1", "k1", 10_000)])
            for round_ in range(3):
                await store.settle(
                    [
                        settlement(ATTEMPT_OUTCOME_WON, 10 + round_, input_tokens=3),
                        settlement(ATTEMPT_OUTCOME_LOST, 2, host="h2", winner_tokens=10),
                    ]
                )
            chain = subjects.ledger_chain(signer.public_key)
            await bus.ensure_topology(nc.jetstream())
            anchorer = Anchorer(nc.jetstream(), chain)
            await anchorer.start()
            assert await anchorer.catch_up(pool) == 4
            assert await anchorer.catch_up(pool) == 0
        finally:
            await pool.close()
        anchors = await read_anchors(nc.jetstream(), chain)
        assert sorted(anchors) == [1, 2, 3, 4]
        yield dsn, signer, anchors


async def reseal(conn: asyncpg.Connection, signer: Signer, start: int) -> None:
    """What a holder of the signing key can do: re-seal every block from `start` over the
    entries as they now are, and make the head and the balances agree."""
    parent = await conn.fetchval(
        "SELECT coalesce((SELECT block_id FROM ledger_blocks WHERE height = $1), $2)",
        start - 1,
        GENESIS_ID,
    )
    heights = [
        r["height"]
        for r in await conn.fetch(
            "SELECT height FROM ledger_blocks WHERE height >= $1 ORDER BY height", start
        )
    ]
    for height in heights:
        rows = await conn.fetch(
            "SELECT block_height, seq, txn_id, leg, account, amount, kind, ref "
            "FROM ledger_entries WHERE block_height = $1 ORDER BY seq",
            height,
        )
        created = await conn.fetchval(
            "SELECT created_unix_nanos FROM ledger_blocks WHERE height = $1", height
        )
        block = signer.seal(height, parent, created, [Entry(*r.values()) for r in rows])
        await conn.execute(
            "UPDATE ledger_blocks SET block_id = $2, parent_id = $3, entry_count = $4, "
            "entries_root = $5, signature = $6 WHERE height = $1",
            height,
            block.block_id,
            block.parent_id,
            block.entry_count,
            block.entries_root,
            block.signature,
        )
        parent = block.block_id
    await conn.execute(
        "UPDATE ledger_head SET height = (SELECT max(height) FROM ledger_blocks), "
        "block_id = (SELECT block_id FROM ledger_blocks ORDER BY height DESC LIMIT 1)"
    )
    await conn.execute("DELETE FROM account_balances")
    await conn.execute(
        "INSERT INTO account_balances SELECT account, sum(amount) FROM ledger_entries "
        "GROUP BY account"
    )
    # And the tables outside the chain, as a careful forger would.
    await conn.execute(
        "DELETE FROM task_settlements WHERE 'attempt:' || attempt_id NOT IN "
        "(SELECT txn_id FROM ledger_entries)"
    )
    await conn.execute(
        "DELETE FROM completed_requests WHERE request_id NOT IN "
        "(SELECT request_id FROM task_settlements WHERE outcome = 'won')"
    )
    await conn.execute("DELETE FROM host_tallies")
    await conn.execute(
        "INSERT INTO host_tallies (host_id, race_wins, race_losses) SELECT host_id, "
        "count(*) FILTER (WHERE outcome = 'won'), count(*) FILTER (WHERE outcome <> 'won') "
        "FROM task_settlements GROUP BY host_id"
    )
    await conn.execute(
        "UPDATE ledger_totals SET completed_responses = (SELECT count(*) FROM "
        "completed_requests), user_charges_micros = (SELECT coalesce(-sum(amount), 0) FROM "
        "ledger_entries WHERE kind = 'charge' AND account LIKE 'user:%')"
    )


Tamper = Callable[[asyncpg.Connection, Signer], Awaitable[None]]


async def raise_last_payout(conn: asyncpg.Connection, signer: Signer) -> None:
    await conn.execute(
        "UPDATE ledger_entries SET amount = amount + 1000 WHERE block_height = 4 AND seq = 1"
    )
    await conn.execute(
        "UPDATE ledger_entries SET amount = amount - 1000 WHERE block_height = 4 AND seq = 0"
    )
    await reseal(conn, signer, 4)


async def cut_the_tail(conn: asyncpg.Connection, signer: Signer) -> None:
    await conn.execute("DELETE FROM ledger_entries WHERE block_height = 4")
    await conn.execute("DELETE FROM ledger_blocks WHERE height = 4")
    await reseal(conn, signer, 4)


async def rewrite_from_the_first_block(conn: asyncpg.Connection, signer: Signer) -> None:
    # Every user debit moved to another account, from block 1 on.
    await conn.execute("UPDATE ledger_entries SET account = 'user:k2' WHERE account = 'user:k1'")
    await reseal(conn, signer, 1)


def edit(sql: str) -> Tamper:
    async def run(conn: asyncpg.Connection, _: Signer) -> None:
        await conn.execute(sql)

    return run


CHAIN_TAMPERS: dict[str, tuple[Tamper, int, str]] = {
    "re-sealed with the key": (raise_last_payout, 4, "anchored"),
    "truncated": (cut_the_tail, 4, "cut off"),
    "prefix rewritten": (rewrite_from_the_first_block, 1, "anchored"),
}
TABLE_TAMPERS: dict[str, tuple[Tamper, str]] = {
    "host_tallies": (edit("UPDATE host_tallies SET race_wins = race_wins + 5"), "host_tallies"),
    "host_tallies deleted": (edit("DELETE FROM host_tallies WHERE host_id = 'h2'"), "h2"),
    "ledger_totals": (
        edit("UPDATE ledger_totals SET user_charges_micros = user_charges_micros - 7"),
        "ledger_totals",
    ),
    "completed_requests": (
        edit(
            "DELETE FROM completed_requests WHERE request_id IN "
            "(SELECT request_id FROM completed_requests LIMIT 1)"
        ),
        "completed_requests",
    ),
    "task_settlements deleted": (
        edit(
            "DELETE FROM task_settlements WHERE outcome = 'lost' AND attempt_id IN "
            "(SELECT attempt_id FROM task_settlements WHERE outcome = 'lost' LIMIT 1)"
        ),
        "task_settlements",
    ),
    "task_settlements outcome": (
        edit("UPDATE task_settlements SET outcome = 'won' WHERE outcome = 'lost'"),
        "task_settlements",
    ),
}


async def tampered(dsn: str, signer: Signer, tamper: Tamper, anchors: dict[int, str] | None):  # type: ignore[no-untyped-def]
    conn = await asyncpg.connect(dsn)
    try:
        tx = conn.transaction(isolation="repeatable_read")
        await tx.start()
        try:
            # As a superuser would: triggers (append-only, foreign keys) off.
            await conn.execute("SET LOCAL session_replication_role = replica")
            await tamper(conn, signer)
            return await verify_ledger(conn, {signer.public_key}, anchors)
        finally:
            await tx.rollback()
    finally:
        await conn.close()


@pytest.mark.parametrize("case", sorted(CHAIN_TAMPERS))
async def test_the_anchors_catch_what_the_signing_key_can_forge(
    ledger: tuple[str, Signer, dict[int, str]], case: str
) -> None:
    dsn, signer, anchors = ledger
    tamper, height, reason = CHAIN_TAMPERS[case]
    # Without the anchors the forgery checks out: that is what the key's holder could do.
    assert (await tampered(dsn, signer, tamper, None)).ok
    verdict: Verdict = await tampered(dsn, signer, tamper, anchors)
    assert not verdict.ok
    assert verdict.bad_height == height, verdict
    assert reason in verdict.reason, verdict


@pytest.mark.parametrize("case", sorted(CHAIN_TAMPERS))
async def test_the_cli_names_the_forged_block(
    ledger: tuple[str, Signer, dict[int, str]],
    nats_url: str,
    control_seed: str | None,
    tmp_path: Path,
    case: str,
) -> None:
    dsn, signer, _ = ledger
    tamper, height, reason = CHAIN_TAMPERS[case]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await tamper(conn, signer)
    finally:
        await conn.close()
    key = str(public_key_path(tmp_path / "accounting" / "ledger.key"))
    common = ["verify", "--database-url", dsn, "--key-file", key, "--data-dir", str(tmp_path)]
    forged = await asyncio.to_thread(llooma, *common, "--no-anchors")
    assert forged.returncode == 0, forged.stdout + forged.stderr
    anchors = ["--nats-url", nats_url, "--seed", control_seed or ""]
    caught = await asyncio.to_thread(llooma, *common, *anchors)
    assert caught.returncode == 1, caught.stdout + caught.stderr
    assert f"first bad block {height}" in caught.stdout, caught.stdout
    assert reason in caught.stdout, caught.stdout


@pytest.mark.parametrize("case", sorted(TABLE_TAMPERS))
async def test_the_tables_outside_the_chain_are_re_derived(
    ledger: tuple[str, Signer, dict[int, str]], case: str
) -> None:
    dsn, signer, anchors = ledger
    tamper, named = TABLE_TAMPERS[case]
    verdict: Verdict = await tampered(dsn, signer, tamper, anchors)
    assert not verdict.ok, case
    assert named in verdict.reason, verdict


async def test_a_clean_chain_matches_its_anchors_and_they_cannot_be_rewritten(
    ledger: tuple[str, Signer, dict[int, str]], nc: Client
) -> None:
    dsn, signer, anchors = ledger
    conn = await asyncpg.connect(dsn)
    try:
        verdict = await verify_ledger(conn, {signer.public_key}, anchors)
    finally:
        await conn.close()
    assert verdict.ok, verdict
    assert (verdict.anchored, verdict.unanchored) == (4, 0)
    js = nc.jetstream()
    chain = subjects.ledger_chain(signer.public_key)
    # A second anchor for a height is refused; the stream itself denies deletes and purges.
    with pytest.raises(APIError):
        await js.publish(subjects.ledger_anchor(chain, 4), b"f" * 64)
    config = (await js.stream_info(subjects.LEDGER_ANCHOR_STREAM)).config
    assert (config.deny_delete, config.deny_purge, config.allow_rollup_hdrs) == (True, True, False)
    assert (await read_anchors(js, chain)) == anchors


async def test_the_control_planes_credential_cannot_remove_or_reconfigure_the_anchors(
    ledger: tuple[str, Signer, dict[int, str]], nc: Client
) -> None:
    """The signer's own NATS credential is refused by the server: deleting the stream, or an
    update that would let a height's anchor be replaced (discard old) or age out, never
    reaches JetStream (a permissions violation: the request goes unanswered); nor does a
    message delete or a purge."""
    _, signer, anchors = ledger
    js = nc.jetstream(timeout=1.0)
    info = await js.stream_info(subjects.LEDGER_ANCHOR_STREAM)
    before = info.config
    with pytest.raises(TimeoutError):
        await js.delete_stream(subjects.LEDGER_ANCHOR_STREAM)
    with pytest.raises(TimeoutError):
        await js.delete_msg(subjects.LEDGER_ANCHOR_STREAM, info.state.last_seq)
    with pytest.raises(TimeoutError):
        await js.purge_stream(subjects.LEDGER_ANCHOR_STREAM)
    loosened = dataclasses.replace(
        before, discard=DiscardPolicy.OLD, discard_new_per_subject=False, max_age=1.0
    )
    with pytest.raises(TimeoutError):
        await js.update_stream(config=loosened)
    after = (await js.stream_info(subjects.LEDGER_ANCHOR_STREAM)).config
    assert (after.discard, after.max_age, after.deny_delete) == (
        before.discard,
        before.max_age,
        True,
    )
    # Anchoring itself still works: a new height is accepted.
    chain = subjects.ledger_chain(signer.public_key)
    height = max(anchors) + 1
    await js.publish(subjects.ledger_anchor(chain, height), b"e" * 64)
    after_anchors = await read_anchors(js, chain)
    assert after_anchors == {**anchors, height: "e" * 64}
