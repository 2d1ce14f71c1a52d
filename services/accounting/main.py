"""Composition root of the accounting service."""

from __future__ import annotations

from pathlib import Path

import asyncpg
from faststream import FastStream
from faststream.nats import NatsBroker
from nacl.signing import SigningKey

from llooma import runtime, subjects
from llooma.db.migrate import migrate
from llooma.ledger import signing_key_path
from llooma.ledger.anchors import Anchorer
from llooma.ledger.blocks import Signer
from llooma.ledger.economics import Prices, SlashRules, opening_balances
from llooma.ledger.store import LedgerStore
from llooma.settings import Settings
from services.accounting.handlers import Accounting, settlement_consumers
from services.accounting.keys import KeyService, build_key_router

SERVICE = "accounting"


# Serialises accounting replicas claiming the ledger's one signer (any constant works).
_SIGNER_LOCK_KEY = 0x11_00_4C_53
_SIGNER_TABLE = (
    "CREATE TABLE IF NOT EXISTS ledger_signer ("
    " singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),"
    " public_key text NOT NULL,"
    " claimed_at timestamptz NOT NULL DEFAULT now())"
)


async def open_signer(pool: asyncpg.Pool, key_path: Path, key_hex: str = "") -> Signer:
    """The block-signing key: the seed in `key_hex` (LLOOMA_LEDGER_SIGNING_KEY) or the file
    at `key_path`, created only for a ledger without blocks and without a signer. One signer
    per ledger: the first replica claims the ledger for its public key (in Postgres, under an
    advisory lock), and one holding another key refuses to start."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SIGNER_LOCK_KEY)
        await conn.execute(_SIGNER_TABLE)
        claimed: str | None = await conn.fetchval("SELECT public_key FROM ledger_signer")
        chain_started = await conn.fetchval("SELECT height FROM ledger_head") > 0
        if key_hex:
            signer = Signer(SigningKey(bytes.fromhex(key_hex.strip())))
        else:
            signer = signer_for(key_path, chain_started=chain_started, claimed=claimed)
        owner = claimed
        if owner is None and chain_started:
            # A ledger from before signers were claimed: its last block names the signer.
            owner = await conn.fetchval(
                "SELECT proposer FROM ledger_blocks ORDER BY height DESC LIMIT 1"
            )
        if owner is not None and owner != signer.public_key:
            raise SystemExit(
                f"accounting: this ledger is signed by the key {owner}, and this replica's "
                f"key ({'LLOOMA_LEDGER_SIGNING_KEY' if key_hex else key_path}) is another, "
                f"{signer.public_key}: two signers would fork the chain. Give every accounting "
                "replica the same signing key (see docs/DEPLOY.md)"
            )
        if claimed is None:
            await conn.execute(
                "INSERT INTO ledger_signer (public_key) VALUES ($1)", signer.public_key
            )
        return signer


def signer_for(key_path: Path, *, chain_started: bool, claimed: str | None = None) -> Signer:
    if (chain_started or claimed is not None) and not key_path.exists():
        # A new key would sign blocks that `llooma ledger verify` cannot trust beside the old
        # ones: a lost key needs a person, not a silent new chain of trust.
        owner = f" (the ledger's signer is {claimed})" if claimed else ""
        raise SystemExit(
            f"accounting: the ledger already has blocks or a signer{owner} but its signing "
            f"key {key_path} is missing; copy it here from the machine that holds it (or point "
            "LLOOMA_LEDGER_SIGNING_KEY_FILE at it, or set LLOOMA_LEDGER_SIGNING_KEY)"
        )
    return Signer.load_or_create(key_path)


async def open_pool(database_url: str, max_size: int = 8) -> asyncpg.Pool:
    """The ledger's connections. A released one goes back as it is: asyncpg's default reset
    sends a query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) on every release, a round
    trip for each of the ledger's queries. The ledger leaves no session state behind (its one
    lock is a transaction's; it neither listens nor sets anything), and asyncpg still rolls
    back a transaction left open before calling `reset`."""
    return await asyncpg.create_pool(
        database_url, min_size=1, max_size=max_size, reset=_keep_session
    )


async def _keep_session(_: asyncpg.Connection) -> None:
    pass


def create_app(settings: Settings) -> FastStream:
    if not settings.database_url:
        raise SystemExit("accounting needs DATABASE_URL")
    accounting = Accounting()
    keys = KeyService(accounting)

    async def open_ledger(broker: NatsBroker) -> None:
        await migrate(settings.database_url)
        pool = await open_pool(settings.database_url)
        try:
            signer = await open_signer(
                pool, signing_key_path(settings), settings.ledger_signing_key
            )
        except SystemExit:
            await pool.close()
            raise
        accounting.store = LedgerStore(
            pool, signer, Prices.from_settings(settings), SlashRules.from_settings(settings)
        )
        accounting.js = broker.config.connection_state.stream
        accounting.anchors = Anchorer(accounting.js, subjects.ledger_chain(signer.public_key))
        await accounting.anchors.start()
        await accounting.anchors.catch_up(pool)
        keys.open(pool)
        # Before this instance says it is ready, so the ingress never 402s a funded key.
        await accounting.store.open_accounts(opening_balances(settings))
        await accounting.store.open_stakes(settings.opening_stakes_micros)
        await accounting.publish_all_balances()
        await keys.publish_all()
        await accounting.publish_summary()
        accounting.start_background(settlement_consumers(accounting))

    async def close_ledger(_: NatsBroker) -> None:
        await accounting.stop_background()
        await accounting.store.pool.close()

    return runtime.build_app(
        SERVICE,
        settings,
        [build_key_router(keys)],
        on_connected=open_ledger,
        on_stopping=close_ledger,
    )


def main() -> None:
    runtime.serve(create_app)
