"""Composition root of the accounting service."""

from __future__ import annotations

import asyncpg
from faststream import FastStream
from faststream.nats import NatsBroker

from llooma import runtime
from llooma.db.migrate import migrate
from llooma.settings import Settings
from services.accounting.handlers import Ledger, build_router

SERVICE = "accounting"


def create_app(settings: Settings) -> FastStream:
    if not settings.database_url:
        raise SystemExit("accounting needs DATABASE_URL")
    ledger = Ledger()

    async def open_database(_: NatsBroker) -> None:
        await migrate(settings.database_url)
        ledger.pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=8)

    async def close_database(_: NatsBroker) -> None:
        await ledger.pool.close()

    return runtime.build_app(
        SERVICE,
        settings,
        [build_router(ledger)],
        on_connected=open_database,
        on_stopping=close_database,
    )


def main() -> None:
    runtime.serve(create_app)
