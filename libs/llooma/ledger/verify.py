"""`llooma ledger verify`: recompute the block chain from the database and name the first
block that does not check out; compare it with the anchors outside the database (a re-sealed,
rewritten or cut chain no longer matches them); check that every transaction sums to zero,
that the stored balances equal the sums of the entries, and re-derive the report's tables
(host tallies, totals, completed requests) and the settlements' agreement with the chain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from llooma.ledger.blocks import GENESIS_ID, Block, Entry, block_problem

BLOCKS = """
SELECT height, block_id, parent_id, created_unix_nanos, proposer, entry_count, entries_root,
       signature
FROM ledger_blocks ORDER BY height
"""
ENTRIES = """
SELECT block_height, seq, txn_id, leg, account, amount, kind, ref
FROM ledger_entries ORDER BY block_height, seq
"""
UNBALANCED = """
SELECT txn_id FROM ledger_entries GROUP BY txn_id HAVING sum(amount) <> 0 ORDER BY txn_id LIMIT 1
"""
DRIFTED_BALANCE = """
SELECT coalesce(s.account, b.account) AS account
FROM (SELECT account, sum(amount) AS total FROM ledger_entries GROUP BY account) AS s
FULL JOIN account_balances AS b ON b.account = s.account
WHERE s.total IS DISTINCT FROM b.balance
ORDER BY 1 LIMIT 1
"""
PREFETCH = 2000

# The report's tables, re-derived from the raw events and the chain. Each query names the
# first row that differs, or nothing.
DRIFTED_TALLY = """
WITH derived AS (
    SELECT host_id, sum(wins) AS race_wins, sum(losses) AS race_losses, sum(duels) AS duels,
           sum(duel_wins) AS duel_wins, sum(duel_ties) AS duel_ties
    FROM (
        SELECT host_id, count(*) FILTER (WHERE outcome = 'won') AS wins,
               count(*) FILTER (WHERE outcome <> 'won') AS losses,
               0 AS duels, 0 AS duel_wins, 0 AS duel_ties
        FROM task_settlements GROUP BY host_id
        UNION ALL
        SELECT host, 0, 0, count(*), count(*) FILTER (WHERE won), count(*) FILTER (WHERE tie)
        FROM (SELECT host_a AS host, outcome = 'a' AS won, outcome = 'tie' AS tie
              FROM duel_settlements
              UNION ALL
              SELECT host_b, outcome = 'b', outcome = 'tie' FROM duel_settlements) AS d
        GROUP BY host
    ) AS parts
    GROUP BY host_id
)
SELECT coalesce(d.host_id, t.host_id)
FROM derived d FULL JOIN host_tallies t ON t.host_id = d.host_id
WHERE (d.race_wins, d.race_losses, d.duels, d.duel_wins, d.duel_ties)
    IS DISTINCT FROM (t.race_wins, t.race_losses, t.duels, t.duel_wins, t.duel_ties)
ORDER BY 1 LIMIT 1
"""
DRIFTED_COMPLETED = """
SELECT coalesce(c.request_id, w.request_id)
FROM completed_requests c
FULL JOIN (SELECT DISTINCT request_id FROM task_settlements WHERE outcome = 'won') AS w
    ON w.request_id = c.request_id
WHERE c.request_id IS NULL OR w.request_id IS NULL
ORDER BY 1 LIMIT 1
"""
DRIFTED_TOTALS = """
SELECT t.completed_responses <> (SELECT count(*) FROM completed_requests)
    OR t.user_charges_micros <> (SELECT coalesce(-sum(amount), 0) FROM ledger_entries
                                 WHERE kind = 'charge' AND account LIKE 'user:%')
FROM ledger_totals t
"""
# A settlement whose row and posting disagree: a posting with no settlement (deleted), or a
# row whose outcome is not the one its posting was priced for (a winner's legs are payouts,
# fallback pay or charges; a loser's, fees).
DRIFTED_SETTLEMENT = """
SELECT e.txn_id
FROM ledger_entries e
LEFT JOIN task_settlements s ON e.txn_id = 'attempt:' || s.attempt_id
WHERE e.txn_id LIKE 'attempt:%' AND e.leg = 0 AND (
    s.attempt_id IS NULL
    OR (s.outcome = 'won' AND e.kind NOT IN ('payout', 'fallback', 'charge'))
    OR (s.outcome <> 'won' AND e.kind NOT IN ('loser_fee', 'fallback')))
ORDER BY 1 LIMIT 1
"""


@dataclass
class Verdict:
    blocks: int = 0
    entries: int = 0
    bad_height: int | None = None
    bad_block_id: str = ""
    reason: str = ""
    # Blocks whose height has an anchor outside the database; the others above them.
    anchored: int = 0
    unanchored: int = 0

    @property
    def ok(self) -> bool:
        return not self.reason

    def fail(self, height: int | None, block_id: str, reason: str) -> Verdict:
        self.bad_height, self.bad_block_id, self.reason = height, block_id, reason
        return self


class _Peekable:
    def __init__(self, rows: AsyncIterator[asyncpg.Record]) -> None:
        self._rows = rows
        self.head: Entry | None = None

    async def advance(self) -> None:
        try:
            self.head = Entry(*(await anext(self._rows)).values())
        except StopAsyncIteration:
            self.head = None


async def verify_ledger(
    conn: asyncpg.Connection, trusted: set[str], anchors: dict[int, str] | None = None
) -> Verdict:
    """Check the whole ledger in one consistent snapshot (against `anchors`, height -> block
    id, read from outside the database, when given)."""
    if conn.is_in_transaction():
        return await _verify(conn, trusted, anchors or {})
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _verify(conn, trusted, anchors or {})


async def _verify(conn: asyncpg.Connection, trusted: set[str], anchors: dict[int, str]) -> Verdict:
    verdict = Verdict()
    entries = _Peekable(conn.cursor(ENTRIES, prefetch=PREFETCH).__aiter__())
    await entries.advance()
    parent_id = GENESIS_ID
    expected = 1
    async for row in conn.cursor(BLOCKS, prefetch=PREFETCH):
        block = Block(*row.values())
        orphan = entries.head
        if orphan is not None and orphan.block_height < block.height:
            return verdict.fail(
                orphan.block_height, "", f"entries at height {orphan.block_height} have no block"
            )
        sealed: list[Entry] = []
        while entries.head is not None and entries.head.block_height == block.height:
            sealed.append(entries.head)
            await entries.advance()
        problem = block_problem(block, expected, parent_id, sealed, trusted)
        if problem is not None:
            return verdict.fail(block.height, block.block_id, problem)
        anchored = anchors.get(block.height)
        if anchored is not None and anchored != block.block_id:
            return verdict.fail(
                block.height,
                block.block_id,
                "block is not the one anchored at its height (the chain was rewritten and "
                "re-sealed)",
            )
        verdict.anchored += anchored is not None
        verdict.blocks += 1
        verdict.entries += len(sealed)
        parent_id = block.block_id
        expected += 1
    if entries.head is not None:
        height = entries.head.block_height
        return verdict.fail(height, "", f"entries at height {height} have no block")
    head = await conn.fetchrow("SELECT height, block_id FROM ledger_head")
    if head is None or (head["height"], head["block_id"]) != (expected - 1, parent_id):
        return verdict.fail(
            expected, "", "the chain's head does not match its last block (a block is missing)"
        )
    last_anchor = max(anchors, default=0)
    if last_anchor > expected - 1:
        return verdict.fail(
            expected,
            anchors.get(expected, ""),
            f"the chain ends at height {expected - 1} but height {last_anchor} was anchored "
            "(blocks were cut off)",
        )
    verdict.unanchored = verdict.blocks - verdict.anchored
    unbalanced = await conn.fetchval(UNBALANCED)
    if unbalanced is not None:
        return verdict.fail(None, "", f"transaction {unbalanced} does not sum to zero")
    drifted = await conn.fetchval(DRIFTED_BALANCE)
    if drifted is not None:
        return verdict.fail(None, "", f"the balance of {drifted} is not the sum of its entries")
    return await _derived_tables(conn, verdict)


async def _derived_tables(conn: asyncpg.Connection, verdict: Verdict) -> Verdict:
    """The tables outside the chain, re-derived from the raw events and the entries."""
    settlement = await conn.fetchval(DRIFTED_SETTLEMENT)
    if settlement is not None:
        return verdict.fail(None, "", f"task_settlements does not match the posting {settlement}")
    host = await conn.fetchval(DRIFTED_TALLY)
    if host is not None:
        return verdict.fail(None, "", f"host_tallies of {host} differ from the settlements")
    request = await conn.fetchval(DRIFTED_COMPLETED)
    if request is not None:
        return verdict.fail(
            None, "", f"completed_requests and the won settlements differ at {request}"
        )
    if await conn.fetchval(DRIFTED_TOTALS):
        return verdict.fail(None, "", "ledger_totals differ from the entries and settlements")
    return verdict
