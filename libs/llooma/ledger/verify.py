"""`llooma ledger verify`: recompute the block chain from the database and name the first
block that does not check out; also that every transaction sums to zero and that the stored
balances equal the sums of the entries."""

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


@dataclass
class Verdict:
    blocks: int = 0
    entries: int = 0
    bad_height: int | None = None
    bad_block_id: str = ""
    reason: str = ""

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


async def verify_ledger(conn: asyncpg.Connection, trusted: set[str]) -> Verdict:
    """Check the whole ledger in one consistent snapshot."""
    if conn.is_in_transaction():
        return await _verify(conn, trusted)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _verify(conn, trusted)


async def _verify(conn: asyncpg.Connection, trusted: set[str]) -> Verdict:
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
    unbalanced = await conn.fetchval(UNBALANCED)
    if unbalanced is not None:
        return verdict.fail(None, "", f"transaction {unbalanced} does not sum to zero")
    drifted = await conn.fetchval(DRIFTED_BALANCE)
    if drifted is not None:
        return verdict.fail(None, "", f"the balance of {drifted} is not the sum of its entries")
    return verdict
