"""`llooma keys`: create, list, update and revoke API keys, and see what each spent. Every
command is a request to accounting's key service over NATS (as the admin API is)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

keys_app = typer.Typer(help="API keys: create, list, update, revoke; spend per key.")
console = Console()
MICROS = 1_000_000
TIMEOUT_S = 10.0

NatsUrl = Annotated[
    str, typer.Option(envvar="NATS_URL", help="NATS; default: the embedded one of `llooma up`")
]
SeedFile = Annotated[
    str,
    typer.Option(
        envvar="LLOOMA_NATS_NKEY_SEED_FILE",
        help="The control plane's nkey seed; default: the embedded stack's",
    ),
]
DataDir = Annotated[Path, typer.Option(help="The stack's data folder")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the reply as JSON")]
Models = Annotated[
    list[str] | None, typer.Option("--model", help="A model the key may use (repeat); none: all")
]


def nats_target(nats_url: str, seed: str, data_dir: Path) -> tuple[str, str | None]:
    if not nats_url:
        port = data_dir / "nats" / "port"
        if not port.exists():
            console.print("[red]no NATS_URL and no embedded NATS server under the data folder")
            raise typer.Exit(2)
        nats_url = f"nats://127.0.0.1:{port.read_text().strip()}"
    if not seed:
        default = data_dir / "credentials" / "control-plane.nk"
        seed = str(default) if default.exists() else ""
    return nats_url, seed or None


def call(request: dict[str, Any], nats_url: str, seed: str, data_dir: Path) -> dict[str, Any]:
    """One request to the key service; exits non-zero on an error reply."""
    from llooma import bus, subjects

    url, seed_file = nats_target(nats_url, seed, data_dir)

    async def run() -> dict[str, Any]:
        nc = await bus.connect(url, "llooma-keys-cli", nkey_seed_file=seed_file, attempts=8)
        try:
            reply = await nc.request(subjects.KEYS_ADMIN, orjson.dumps(request), timeout=TIMEOUT_S)
        finally:
            await nc.close()
        answer: dict[str, Any] = orjson.loads(reply.data)
        return answer

    try:
        answer = asyncio.run(run())
    except Exception as error:
        console.print(f"[red]accounting's key service did not answer: {error}[/red]")
        raise typer.Exit(3) from error
    if answer["status"] >= 400:
        console.print(f"[red]{answer['body']['error']['message']}[/red]")
        raise typer.Exit(1)
    body: dict[str, Any] = answer["body"]
    return body


def credits(micros: int) -> str:
    return f"{Decimal(micros) / MICROS:,.6f}"


def _when(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    return datetime.fromtimestamp(unix_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print_json(body: object) -> None:
    typer.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())


@keys_app.command("create")
def create(
    name: str,
    owner: Annotated[str, typer.Option(help="Who the key is for")] = "",
    budget: Annotated[str, typer.Option(help="Credits it opens with (decimal)")] = "0",
    rpm: Annotated[int, typer.Option(help="Requests per minute (0: the default)")] = 0,
    tpm: Annotated[int, typer.Option(help="Tokens per minute (0: the default)")] = 0,
    model: Models = None,
    expires_at: Annotated[str, typer.Option(help="ISO-8601 time; none: never")] = "",
    as_json: AsJson = False,
    nats_url: NatsUrl = "",
    seed: SeedFile = "",
    data_dir: DataDir = Path(".llooma"),
) -> None:
    """Create a key; it is printed once, here, and never stored."""
    request: dict[str, Any] = {
        "op": "create",
        "name": name,
        "owner": owner,
        "budget": budget,
        "rpm": rpm,
        "tpm": tpm,
        "models": model or [],
        "expires_at": expires_at or None,
    }
    body = call(request, nats_url, seed, data_dir)
    if as_json:
        _print_json(body)
        return
    console.print(f"key     : [bold]{body['key']}[/bold]  (shown once: keep it now)")
    console.print(f"key id  : {body['key_id']}")
    console.print(f"balance : {credits(body['balance_micros'])} credits")


@keys_app.command("list")
def list_keys(
    all_keys: Annotated[bool, typer.Option("--all", help="Revoked keys too")] = False,
    owner: Annotated[str, typer.Option(help="Only this owner's keys")] = "",
    as_json: AsJson = False,
    nats_url: NatsUrl = "",
    seed: SeedFile = "",
    data_dir: DataDir = Path(".llooma"),
) -> None:
    """Managed keys (not revoked, unless --all) with their limits and balances."""
    request = {"op": "list", "include_revoked": all_keys, "owner": owner}
    body = call(request, nats_url, seed, data_dir)
    if as_json:
        _print_json(body)
        return
    table = Table(title="API keys")
    columns = ("key id", "name", "owner", "key", "balance", "rpm", "tpm", "models", "expires")
    for column in (*columns, "revoked"):
        table.add_column(column)
    for r in body["data"]:
        table.add_row(
            r["key_id"],
            r["name"],
            r["owner"],
            r["prefix"],
            credits(r["balance_micros"]),
            str(r["rpm"] or "-"),
            str(r["tpm"] or "-"),
            ",".join(r["models"]) or "all",
            _when(r["expires_unix_ms"]),
            _when(r["revoked_unix_ms"]),
        )
    console.print(table)


@keys_app.command("update")
def update(
    key: Annotated[str, typer.Argument(help="Key id or name")],
    name: Annotated[str | None, typer.Option()] = None,
    owner: Annotated[str | None, typer.Option()] = None,
    rpm: Annotated[int | None, typer.Option()] = None,
    tpm: Annotated[int | None, typer.Option()] = None,
    model: Models = None,
    all_models: Annotated[bool, typer.Option(help="Allow every model again")] = False,
    expires_at: Annotated[str | None, typer.Option(help="ISO-8601; '' never expires")] = None,
    add_budget: Annotated[str, typer.Option(help="Credits to add (a signed deposit)")] = "0",
    idempotency_key: Annotated[str, typer.Option(help="The same one never adds twice")] = "",
    as_json: AsJson = False,
    nats_url: NatsUrl = "",
    seed: SeedFile = "",
    data_dir: DataDir = Path(".llooma"),
) -> None:
    """Change a key's name, owner, limits, models or expiry, or top its budget up."""
    request: dict[str, Any] = {"op": "update", "key": key, "add_budget": add_budget}
    for field, value in (("name", name), ("owner", owner), ("rpm", rpm), ("tpm", tpm)):
        if value is not None:
            request[field] = value
    if model or all_models:
        request["models"] = [] if all_models else model
    if expires_at is not None:
        request["expires_at"] = expires_at or None
    if idempotency_key:
        request["idempotency_key"] = idempotency_key
    body = call(request, nats_url, seed, data_dir)
    if as_json:
        _print_json(body)
        return
    console.print(f"updated {body['key_id']} ({body['name']})")
    console.print(f"balance : {credits(body['balance_micros'])} credits")


@keys_app.command("revoke")
def revoke(
    key: Annotated[str, typer.Argument(help="Key id or name")],
    nats_url: NatsUrl = "",
    seed: SeedFile = "",
    data_dir: DataDir = Path(".llooma"),
) -> None:
    """Revoke a key: every ingress refuses it (401) within about a second."""
    body = call({"op": "revoke", "key": key}, nats_url, seed, data_dir)
    console.print(f"revoked {body['key_id']} ({body['name']})")


@keys_app.command("usage")
def usage(
    key: Annotated[str, typer.Argument(help="Key id or name; none: every key")] = "",
    since: Annotated[str, typer.Option(help="ISO-8601 time")] = "",
    until: Annotated[str, typer.Option(help="ISO-8601 time")] = "",
    as_json: AsJson = False,
    nats_url: NatsUrl = "",
    seed: SeedFile = "",
    data_dir: DataDir = Path(".llooma"),
) -> None:
    """Requests, tokens and credits by key and model, from the ledger's charges."""
    request = {"op": "usage", "key": key, "since": since, "until": until}
    body = call(request, nats_url, seed, data_dir)
    if as_json:
        _print_json(body)
        return
    table = Table(title="Spend per key")
    for column in ("key id", "name", "model", "requests", "input", "output", "credits"):
        table.add_column(column)
    for line in body["data"]:
        table.add_row(
            line["key_id"],
            line["name"],
            line["model"],
            str(line["requests"]),
            str(line["input_tokens"]),
            str(line["output_tokens"]),
            credits(line["credits_micros"]),
        )
    totals = body["totals"]
    table.add_row(
        "total",
        "",
        "",
        str(totals["requests"]),
        str(totals["input_tokens"]),
        str(totals["output_tokens"]),
        credits(totals["credits_micros"]),
    )
    console.print(table)
