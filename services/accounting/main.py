"""Composition root of the accounting service."""

from __future__ import annotations

import asyncpg
from faststream import FastStream
from faststream.nats import NatsBroker

from llooma import runtime
from llooma.db.migrate import migrate
from llooma.ledger import signing_key_path
from llooma.ledger.blocks import Signer
from llooma.ledger.economics import Prices, opening_balances
from llooma.ledger.store import LedgerStore
from llooma.settings import Settings
from services.accounting.handlers import Accounting, build_router

SERVICE = "accounting"


def create_app(settings: Settings) -> FastStream:
    if not settings.database_url:
        raise SystemExit("accounting needs DATABASE_URL")
    accounting = Accounting()

    async def open_ledger(broker: NatsBroker) -> None:
        await migrate(settings.database_url)
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=8)
        signer = Signer.load_or_create(signing_key_path(settings))
        accounting.store = LedgerStore(pool, signer, Prices.from_settings(settings))
        accounting.js = broker.config.connection_state.stream
        # Before this instance says it is ready, so the ingress never 402s a funded key.
        await accounting.store.open_accounts(opening_balances(settings))
        await accounting.refresh_balances()
        await accounting.publish_summary()
        accounting.start_refresher()

    async def close_ledger(_: NatsBroker) -> None:
        await accounting.stop_refresher()
        await accounting.store.pool.close()

    return runtime.build_app(
        SERVICE,
        settings,
        [build_router(accounting)],
        on_connected=open_ledger,
        on_stopping=close_ledger,
    )


def main() -> None:
    runtime.serve(create_app)
