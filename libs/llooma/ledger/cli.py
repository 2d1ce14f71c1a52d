"""`llooma ledger`: verify the chain, report the economics, credit a key."""

from __future__ import annotations

import asyncio
import re
import uuid
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from llooma.settings import api_key_id, load_settings

if TYPE_CHECKING:
    from llooma.ledger.blocks import Signer

ledger_app = typer.Typer(
    help="The payout ledger: verify the chain, report, credit a key, lock a host's stake."
)
console = Console()
MICROS = 1_000_000
_KEY_ID = re.compile(r"^[0-9a-f]{32}$")

DatabaseUrl = Annotated[
    str, typer.Option(envvar="DATABASE_URL", help="Postgres; default: the embedded one")
]
DataDir = Annotated[Path, typer.Option(help="The stack's data folder")]
KeyFile = Annotated[
    Path | None,
    typer.Option(help="The block-signing key (seed or .pub); default from the settings"),
]


def _database_url(database_url: str, data_dir: Path) -> str:
    if database_url:
        return database_url
    folder = (data_dir / "postgres").resolve()
    if not folder.exists():
        console.print("[red]no DATABASE_URL and no embedded Postgres under the data folder[/red]")
        raise typer.Exit(2)
    # pgserver listens on a Unix socket in its data folder (the stack must be running).
    return f"postgresql://postgres:@/postgres?host={folder}"


def _key_file(key_file: Path | None) -> Path:
    from llooma.ledger import signing_key_path

    return key_file or signing_key_path(load_settings())


def _key_hash_secret(data_dir: Path) -> bytes | None:
    """The environment's key-hash secret, else the one `llooma up` made under `data_dir`."""
    import os

    from llooma.settings import KEY_HASH_SECRET_ENV, KEY_HASH_SECRET_FILE_ENV

    stack_secret = data_dir / "secrets" / "key-hash.secret"
    if os.environ.get(KEY_HASH_SECRET_ENV) or os.environ.get(KEY_HASH_SECRET_FILE_ENV):
        return None
    return stack_secret.read_text().strip().encode() if stack_secret.exists() else None


def credits(micros: int) -> str:
    return f"{Decimal(micros) / MICROS:,.6f}"


@ledger_app.command("verify")
def verify(
    database_url: DatabaseUrl = "",
    data_dir: DataDir = Path(".llooma"),
    key_file: KeyFile = None,
    nats_url: Annotated[
        str, typer.Option(envvar="NATS_URL", help="Where the anchors are; default: embedded")
    ] = "",
    seed: Annotated[str, typer.Option(envvar="LLOOMA_NATS_NKEY_SEED_FILE")] = "",
    anchors: Annotated[
        bool, typer.Option(help="Compare with the anchors outside the database")
    ] = True,
) -> None:
    """Recompute every block from the database and compare it with its anchor; name the first
    one that does not check out; re-derive the report's tables."""
    import asyncpg

    from llooma import bus, subjects
    from llooma.keys.cli import nats_target
    from llooma.ledger.anchors import read_anchors
    from llooma.ledger.blocks import trusted_key
    from llooma.ledger.verify import Verdict, verify_ledger

    public_key = trusted_key(_key_file(key_file))
    trusted = {public_key}

    async def anchored() -> dict[int, str] | None:
        if not anchors:
            return None
        url, seed_file = nats_target(nats_url, seed, data_dir)
        nc = await bus.connect(url, "llooma-ledger-verify", nkey_seed_file=seed_file, attempts=8)
        try:
            return await read_anchors(nc.jetstream(), subjects.ledger_chain(public_key))
        finally:
            await nc.close()

    async def run() -> Verdict:
        found = await anchored()
        conn = await asyncpg.connect(_database_url(database_url, data_dir))
        try:
            return await verify_ledger(conn, trusted, found)
        finally:
            await conn.close()

    verdict = asyncio.run(run())
    if verdict.ok:
        console.print(f"ledger ok: {verdict.blocks} blocks, {verdict.entries} entries")
        if anchors:
            console.print(
                f"{verdict.anchored} blocks match their anchors; {verdict.unanchored} not "
                "anchored yet (accounting anchors each block within a few seconds)"
            )
        return
    where = f"block {verdict.bad_height}" if verdict.bad_height is not None else "ledger"
    if verdict.bad_block_id:
        where += f" ({verdict.bad_block_id[:16]})"
    console.print(f"[red]first bad {where}: {verdict.reason}[/red]")
    console.print(f"{verdict.blocks} blocks before it checked out")
    raise typer.Exit(1)


@ledger_app.command("report")
def report(database_url: DatabaseUrl = "", data_dir: DataDir = Path(".llooma")) -> None:
    """Cost per successful response, payouts and race wins per host."""
    import asyncpg

    from llooma.ledger.store import read_summary
    from llooma.v1.ledger_pb2 import LedgerSummary

    async def run() -> LedgerSummary:
        conn = await asyncpg.connect(_database_url(database_url, data_dir))
        try:
            return await read_summary(conn)
        finally:
            await conn.close()

    summary = asyncio.run(run())
    totals = Table(title="Ledger (credits)", show_header=False)
    totals.add_row("completed responses", str(summary.completed_responses))
    totals.add_row("user charges", credits(summary.user_charges_micros))
    totals.add_row("host payouts", credits(summary.host_payouts_micros))
    totals.add_row("fallback cost", credits(summary.fallback_cost_micros))
    totals.add_row(
        "cost per successful response",
        credits(round(summary.cost_per_successful_response_micros)),
    )
    totals.add_row("blocks", f"{summary.blocks} (head {summary.head_block_id[:16]})")
    console.print(totals)
    hosts = Table(title="Hosts")
    for column in ("host", "payouts", "race wins", "race losses", "duels", "quality"):
        hosts.add_column(column, justify="left" if column == "host" else "right")
    for line in summary.hosts:
        hosts.add_row(
            line.host_id,
            credits(line.payouts_micros),
            str(line.race_wins),
            str(line.race_losses),
            str(line.duels),
            f"{line.quality:.3f}",
        )
    console.print(hosts)


@ledger_app.command("credit")
def credit(
    key: Annotated[str, typer.Argument(help="An API key, or its 32-hex key id")],
    amount: Annotated[str, typer.Argument(help="Credits to add (decimal)")],
    database_url: DatabaseUrl = "",
    data_dir: DataDir = Path(".llooma"),
    key_file: KeyFile = None,
    idempotency_key: Annotated[
        str,
        typer.Option(
            help="Names this credit: re-running with the same one credits nothing again "
            "(default: a new one each run)"
        ),
    ] = "",
) -> None:
    """Add credits to a key's balance (a signed deposit; the ingress sees it within ~2 s)."""
    import asyncpg

    from llooma.ledger.blocks import Signer
    from llooma.ledger.economics import Prices, deposit
    from llooma.ledger.store import LedgerStore

    try:
        micros = int(Decimal(amount) * MICROS)
    except InvalidOperation as error:
        raise typer.BadParameter(f"not a number: {amount}") from error
    if micros <= 0:
        raise typer.BadParameter("the amount must be positive")
    key_id = key if _KEY_ID.match(key) else api_key_id(key, _key_hash_secret(data_dir))
    signing_key = _key_file(key_file)
    if not signing_key.exists():
        # Blocks signed by a key of its own would not verify against accounting's.
        console.print(f"[red]no signing key at {signing_key}: start accounting first[/red]")
        raise typer.Exit(2)
    signer = Signer.load(signing_key)
    txn_id = f"credit:{idempotency_key or uuid.uuid4().hex}"

    async def run() -> tuple[bool, int]:
        pool = await asyncpg.create_pool(
            _database_url(database_url, data_dir), min_size=1, max_size=1
        )
        try:
            store = LedgerStore(pool, signer, Prices())
            posted = await store.deposit([deposit(txn_id, key_id, micros)])
            return posted.new > 0, await store.user_balance(key_id)
        finally:
            await pool.close()

    done, balance = asyncio.run(run())
    if done:
        console.print(
            f"credited {credits(micros)} to {key_id}; balance {credits(balance)}", soft_wrap=True
        )
    else:
        console.print(
            f"{txn_id} was credited before: nothing added; {key_id} balance {credits(balance)}",
            soft_wrap=True,
        )


def _micros(amount: str) -> int:
    try:
        micros = int(Decimal(amount) * MICROS)
    except InvalidOperation as error:
        raise typer.BadParameter(f"not a number: {amount}") from error
    if micros <= 0:
        raise typer.BadParameter("the amount must be positive")
    return micros


def _host(host: str) -> str:
    from llooma.subjects import checked_token

    try:
        return checked_token(host)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


def _signer(key_file: Path | None) -> Signer:
    from llooma.ledger.blocks import Signer

    signing_key = _key_file(key_file)
    if not signing_key.exists():
        # Blocks signed by a key of its own would not verify against accounting's.
        console.print(f"[red]no signing key at {signing_key}: start accounting first[/red]")
        raise typer.Exit(2)
    return Signer.load(signing_key)


IdempotencyKey = Annotated[
    str,
    typer.Option(
        help="Names this operation: re-running with the same one does nothing again "
        "(default: a new one each run)"
    ),
]


@ledger_app.command("stake")
def stake(
    host: Annotated[str, typer.Argument(help="The host's name (as in `llooma hosts add`)")],
    amount: Annotated[str, typer.Argument(help="Credits to lock (decimal)")],
    funding: Annotated[
        str,
        typer.Option(
            "--from",
            help="`treasury` (the operator issues the stake, e.g. paid for outside) or `host` "
            "(locked from the host's own earnings, which must cover it)",
        ),
    ] = "treasury",
    database_url: DatabaseUrl = "",
    data_dir: DataDir = Path(".llooma"),
    key_file: KeyFile = None,
    idempotency_key: IdempotencyKey = "",
) -> None:
    """Lock credits as a host's stake (a signed transfer into `stake:<host>`): its weight in
    the dispatcher's draw (within ~2 s), and what a slash takes from."""
    import asyncpg

    from llooma.ledger.economics import TREASURY, Prices, host_account
    from llooma.ledger.store import LedgerStore, NotEnoughCredits

    host = _host(host)
    micros = _micros(amount)
    sources = {"treasury": TREASURY, "host": host_account(host)}
    if funding not in sources:
        raise typer.BadParameter("--from is `treasury` or `host`")
    signer = _signer(key_file)
    txn_id = f"stake:{host}:{idempotency_key or uuid.uuid4().hex}"

    async def run() -> tuple[bool, int]:
        pool = await asyncpg.create_pool(
            _database_url(database_url, data_dir), min_size=1, max_size=1
        )
        try:
            store = LedgerStore(pool, signer, Prices())
            posted = await store.lock_stake(txn_id, host, micros, sources[funding])
            _, stakes = await store.stakes()
            return posted.new > 0, stakes.get(host, 0)
        finally:
            await pool.close()

    try:
        done, locked = asyncio.run(run())
    except NotEnoughCredits as error:
        console.print(f"[red]not staked: {error}[/red]")
        raise typer.Exit(1) from error
    if done:
        console.print(
            f"locked {credits(micros)} for {host}; its stake {credits(locked)}", soft_wrap=True
        )
    else:
        console.print(
            f"{txn_id} was posted before: nothing locked; {host} stake {credits(locked)}",
            soft_wrap=True,
        )


@ledger_app.command("unstake")
def unstake(
    host: Annotated[str, typer.Argument(help="The host's name")],
    amount: Annotated[str, typer.Argument(help="Credits to unlock (decimal)")],
    database_url: DatabaseUrl = "",
    data_dir: DataDir = Path(".llooma"),
    key_file: KeyFile = None,
    idempotency_key: IdempotencyKey = "",
) -> None:
    """Ask for stake back: it stays locked (weighted and slashable) for
    LLOOMA_STAKE_UNLOCK_DELAY_S, then accounting pays what is left of it to `host:<host>`."""
    import asyncpg

    from llooma.ledger.economics import Prices
    from llooma.ledger.store import LedgerStore, NotEnoughCredits

    host = _host(host)
    micros = _micros(amount)
    signer = _signer(key_file)
    delay_s = load_settings().stake_unlock_delay_s
    txn_id = f"unstake:{host}:{idempotency_key or uuid.uuid4().hex}"

    async def run() -> bool:
        pool = await asyncpg.create_pool(
            _database_url(database_url, data_dir), min_size=1, max_size=1
        )
        try:
            return await LedgerStore(pool, signer, Prices()).request_unlock(
                txn_id, host, micros, delay_s
            )
        finally:
            await pool.close()

    try:
        done = asyncio.run(run())
    except NotEnoughCredits as error:
        console.print(f"[red]not unlocked: {error}[/red]")
        raise typer.Exit(1) from error
    if done:
        console.print(
            f"{credits(micros)} of {host}'s stake unlocks in {delay_s:.0f} s ({txn_id}); it "
            "stays locked and slashable until then",
            soft_wrap=True,
        )
    else:
        console.print(f"{txn_id} was asked before: nothing more unlocks", soft_wrap=True)
