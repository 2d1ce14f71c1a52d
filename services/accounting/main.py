"""Composition root of the accounting service."""

from __future__ import annotations

from pathlib import Path

import asyncpg
from faststream import FastStream
from faststream.nats import NatsBroker

from llooma import runtime, subjects
from llooma.db.migrate import migrate
from llooma.ledger import signing_key_path
from llooma.ledger.anchors import Anchorer
from llooma.ledger.blocks import Signer
from llooma.ledger.economics import Prices, opening_balances
from llooma.ledger.store import LedgerStore, ledger_height
from llooma.settings import Settings
from services.accounting.handlers import Accounting, build_router
from services.accounting.keys import KeyService, build_key_router

SERVICE = "accounting"


async def open_signer(pool: asyncpg.Pool, key_path: Path) -> Signer:
    """The block-signing key; created only for a ledger without blocks."""
    return signer_for(key_path, chain_started=await ledger_height(pool) > 0)


def signer_for(key_path: Path, *, chain_started: bool) -> Signer:
    if chain_started and not key_path.exists():
        # A new key would sign blocks that `llooma ledger verify` cannot trust beside the old
        # ones: a lost key needs a person, not a silent new chain of trust.
        raise SystemExit(
            f"accounting: the ledger already has blocks but its signing key {key_path} is "
            "missing; restore it (or point LLOOMA_LEDGER_SIGNING_KEY_FILE at it)"
        )
    return Signer.load_or_create(key_path)


def create_app(settings: Settings) -> FastStream:
    if not settings.database_url:
        raise SystemExit("accounting needs DATABASE_URL")
    accounting = Accounting()
    keys = KeyService(accounting)

    async def open_ledger(broker: NatsBroker) -> None:
        await migrate(settings.database_url)
        pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=8)
        try:
            signer = await open_signer(pool, signing_key_path(settings))
        except SystemExit:
            await pool.close()
            raise
        accounting.store = LedgerStore(pool, signer, Prices.from_settings(settings))
        accounting.js = broker.config.connection_state.stream
        accounting.anchors = Anchorer(accounting.js, subjects.ledger_chain(signer.public_key))
        await accounting.anchors.start()
        await accounting.anchors.catch_up(pool)
        keys.open(pool)
        # Before this instance says it is ready, so the ingress never 402s a funded key.
        await accounting.store.open_accounts(opening_balances(settings))
        await accounting.publish_all_balances()
        await keys.publish_all()
        await accounting.publish_summary()
        accounting.start_background()

    async def close_ledger(_: NatsBroker) -> None:
        await accounting.stop_background()
        await accounting.store.pool.close()

    return runtime.build_app(
        SERVICE,
        settings,
        [build_router(accounting), build_key_router(keys)],
        on_connected=open_ledger,
        on_stopping=close_ledger,
    )


def main() -> None:
    runtime.serve(create_app)
