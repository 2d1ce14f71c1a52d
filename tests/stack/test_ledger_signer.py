"""One signer per ledger: accounting replicas on an empty ledger never each create a key of
their own; one holding another key than the ledger's refuses to start, saying why; and the key
sits in a folder of its own, apart from the data, told to accounting alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from llooma.ledger.blocks import Signer
from llooma.stack import SIGNER_ONLY_ENV, Stack
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


def test_the_signing_key_is_apart_from_the_data_and_told_only_to_accounting(stack: Stack) -> None:
    key = stack.ledger_key_file
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert oct(key.parent.stat().st_mode & 0o777) == "0o700"
    # A folder of its own: no database, NATS store or other credential beside it.
    assert sorted(p.name for p in key.parent.iterdir()) == [key.name, f"{key.stem}.pub"]
    told = set()
    for child in stack.children:
        assert child.process is not None
        environ = Path(f"/proc/{child.process.pid}/environ").read_bytes().split(b"\0")
        names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
        if names & SIGNER_ONLY_ENV:
            told.add(child.name)
    assert told == {"accounting"}
