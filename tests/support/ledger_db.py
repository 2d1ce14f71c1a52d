"""A fresh, migrated database of its own for a ledger test module (on the session's Postgres),
so its counts and tampering never meet the running stack's ledger."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from llooma.db.migrate import migrate


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@asynccontextmanager
async def fresh_database(url: str) -> AsyncIterator[str]:
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(url, name)
    await migrate(dsn)
    try:
        yield dsn
    finally:
        admin = await asyncpg.connect(url)
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def new_database(url: str, prefix: str) -> str:
    """A new, empty database on the same server (for a stack of a test module's own: its
    ledger, signed by its own key, must not share blocks with the session stack's)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        admin = await asyncpg.connect(url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()

    asyncio.run(create())
    return with_database(url, name)
