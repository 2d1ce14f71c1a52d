"""Accounting's connection pool skips asyncpg's reset query on release, and still leaves no
transaction (nor the signer's lock) to the next user of a connection."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.accounting.main import open_pool
from tests.support.ledger_db import fresh_database


@pytest.fixture
async def dsn(database_url: str) -> AsyncIterator[str]:
    async with fresh_database(database_url) as fresh:
        yield fresh


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    created = await open_pool(dsn, max_size=1)
    yield created
    await created.close()


async def test_a_released_connection_is_not_reset_by_a_query(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("SET application_name = 'kept'")
    async with pool.acquire() as conn:
        # asyncpg's default reset (RESET ALL) would have put it back to ''.
        assert await conn.fetchval("SHOW application_name") == "kept"


async def test_a_transaction_left_open_is_rolled_back_on_release(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS left_open (n int)")
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO left_open VALUES (1)")
    async with pool.acquire() as conn:
        assert not await conn.fetchval("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
        assert await conn.fetchval("SELECT count(*) FROM left_open") == 0


async def test_a_transactions_advisory_lock_ends_with_it(pool: asyncpg.Pool, dsn: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7)")
    other = await asyncpg.connect(dsn)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock(7)")
    finally:
        await other.close()
