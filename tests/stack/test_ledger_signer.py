"""One signer per ledger: accounting replicas on an empty ledger never each create a key of
their own; one holding another key than the ledger's refuses to start, saying why."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from llooma.ledger.blocks import Signer
from services.accounting.main import open_signer
from tests.support.ledger_db import fresh_database


async def start(pool: asyncpg.Pool, key: Path) -> Signer | SystemExit:
    """One replica's start (asyncio would not hand a SystemExit back through gather)."""
    try:
        return await open_signer(pool, key)
    except SystemExit as refused:
        return refused


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with fresh_database(database_url) as dsn:
        created = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
        yield created
        await created.close()


async def test_two_replicas_on_an_empty_ledger_share_one_signer(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # Two machines, neither with a key yet: the first creates and claims one; the second
    # must not create its own.
    first, second = tmp_path / "a" / "ledger.key", tmp_path / "b" / "ledger.key"
    results = await asyncio.gather(start(pool, first), start(pool, second))
    signers = [r for r in results if isinstance(r, Signer)]
    refused = [r for r in results if isinstance(r, SystemExit)]
    assert len(signers) == 1, results
    assert len(refused) == 1, results
    assert "copy it here" in str(refused[0])
    assert first.exists() != second.exists()
    # The same key, from the file or as the seed in the environment, is welcome.
    holder = first if first.exists() else second
    assert (await open_signer(pool, holder)).public_key == signers[0].public_key
    seed = holder.read_text().strip()
    assert (await open_signer(pool, tmp_path / "none", seed)).public_key == signers[0].public_key


async def test_a_replica_with_another_key_refuses_to_start(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    mine = await open_signer(pool, tmp_path / "mine.key")
    other = Signer.load_or_create(tmp_path / "other.key")
    assert other.public_key != mine.public_key
    with pytest.raises(SystemExit, match="two signers would fork the chain"):
        await open_signer(pool, tmp_path / "other.key")
    with pytest.raises(SystemExit, match=mine.public_key):
        await open_signer(pool, tmp_path / "elsewhere.key", (tmp_path / "other.key").read_text())
