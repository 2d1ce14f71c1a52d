"""Versioned SQL migrations: files `NNNN_name.sql`, applied once each, in order."""

from __future__ import annotations

from importlib import resources

import asyncpg

# Any constant works; it only serialises concurrent migrators.
_MIGRATION_LOCK_KEY = 0x11_00_4D_41


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("llooma.db") / "migrations"
    files = sorted(
        (entry.name, entry.read_text()) for entry in folder.iterdir() if entry.name.endswith(".sql")
    )
    return [(name.removesuffix(".sql"), sql) for name, sql in files]


async def migrate(dsn: str) -> list[str]:
    """Apply pending migrations; returns the versions applied now. Safe to run concurrently."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for version, sql in migration_files():
                if version in done:
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                applied.append(version)
            return applied
    finally:
        await conn.close()
