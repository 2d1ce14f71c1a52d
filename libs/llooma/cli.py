"""The `llooma` command."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
import uvloop
from rich.console import Console

from llooma import bus, tracing
from llooma.engine.cli import engine_app
from llooma.host.config import HostConfigError, load_host_config
from llooma.ledger.cli import ledger_app
from llooma.settings import DEV_API_KEY

app = typer.Typer(help="LLooMA: one fast, private, dependable LLM service over many hosts.")
console = Console()


@app.command()
def up(
    http_port: Annotated[int, typer.Option(envvar="LLOOMA_HTTP_PORT")] = 8080,
    data_dir: Annotated[Path, typer.Option(help="Where NATS and Postgres keep data")] = Path(
        ".llooma"
    ),
) -> None:
    """Run the whole stack on this machine until Ctrl-C or SIGTERM."""
    from llooma.stack import Stack

    stack = Stack(
        root=data_dir.resolve(),
        http_port=http_port,
        nats_url=os.environ.get("NATS_URL") or None,
        database_url=os.environ.get("DATABASE_URL") or None,
    )
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    console.print("starting NATS, Postgres, 8 services and 3 hosts ...")
    try:
        stack.start()
    except Exception as error:
        console.print(f"[red]could not start the stack:[/red] {error}")
        raise typer.Exit(1) from error
    console.print(
        f"\n[bold green]LLooMA is up[/bold green] at {stack.base_url}\n"
        f"  API key : {DEV_API_KEY}\n"
        f"  models  : llooma, synthetic-small, echo\n"
        f"  logs    : {data_dir / 'logs'}\n\n"
        f"  curl {stack.base_url}/v1/chat/completions \\\n"
        f'    -H "Authorization: Bearer {DEV_API_KEY}" -H "Content-Type: application/json" \\\n'
        """    -d '{"model": "llooma", "stream": true, """
        """"messages": [{"role": "user", "content": "Hello!"}]}'\n\n"""
        "Ctrl-C stops everything."
    )
    try:
        while not stopping:
            time.sleep(0.5)
            for name in stack.restart_crashed():
                console.print(f"[yellow]{name} exited; restarted it[/yellow]")
    finally:
        console.print("stopping ...")
        stack.stop()
        console.print("stopped.")


@app.command()
def host(config: Annotated[Path, typer.Option(help="Host YAML config")]) -> None:
    """Run a host worker that serves the models in its config."""
    from llooma.host.worker import run_worker

    try:
        host_config = load_host_config(config)
    except HostConfigError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from error

    refused: list[str] = []

    async def serve() -> None:
        stop = asyncio.Event()

        async def on_error(error: Exception) -> None:
            # A revoked or unknown credential: retrying cannot help, so leave.
            if "authorization" in str(error).lower():
                refused.append(str(error))
                stop.set()

        nc = await bus.connect(
            host_config.nats_url,
            f"llooma-host-{host_config.name}",
            nkey_seed_file=str(host_config.credentials) if host_config.credentials else None,
            error_cb=on_error,
            attempts=20,
        )
        await run_worker(host_config, nc, stop)

    tracing.setup("host", instance_id=host_config.name)
    try:
        uvloop.run(serve())
    except ConnectionError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(3) from error
    if refused:
        console.print(f"[red]NATS refused this host's credential: {refused[0]}[/red]")
        raise typer.Exit(3)


app.add_typer(ledger_app, name="ledger")
app.add_typer(engine_app, name="engine")
hosts_app = typer.Typer(help="Host credentials for the embedded NATS server.")
app.add_typer(hosts_app, name="hosts")
DataDir = Annotated[Path, typer.Option(help="The stack's data folder")]


def _apply_credentials(data_dir: Path) -> str:
    """Re-render the embedded server's config and reload it, if the server has run here."""
    from llooma.credentials import CredentialStore, reload_nats
    from llooma.embedded import write_nats_config

    nats_dir = data_dir / "nats"
    port_file = nats_dir / "port"
    if not port_file.exists():
        return "no embedded NATS server has run here; it will pick this up when it starts"
    store = CredentialStore(data_dir / "credentials")
    write_nats_config(nats_dir, store, int(port_file.read_text()))
    if reload_nats(nats_dir / "nats-server.pid"):
        return "the running NATS server has reloaded its permissions"
    return "no NATS server is running; the next `llooma up` uses this"


@hosts_app.command("add")
def hosts_add(name: str, data_dir: DataDir = Path(".llooma")) -> None:
    """Issue NAME its own NATS credential (an nkey seed) and admit it."""
    from llooma.credentials import CredentialStore

    try:
        path = CredentialStore(data_dir / "credentials").issue(name)
    except ValueError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from error
    console.print(f"credential for {name}: {path.resolve()}")
    console.print("put it in the host's YAML as `credentials: <path>`")
    console.print(_apply_credentials(data_dir))


@hosts_app.command("revoke")
def hosts_revoke(name: str, data_dir: DataDir = Path(".llooma")) -> None:
    """Withdraw NAME's credential; a connected host is cut off at once."""
    from llooma.credentials import CredentialStore

    if not CredentialStore(data_dir / "credentials").revoke(name):
        console.print(f"[red]no host named {name!r} holds a credential[/red]")
        raise typer.Exit(1)
    console.print(f"revoked {name}")
    console.print(_apply_credentials(data_dir))


@hosts_app.command("list")
def hosts_list(data_dir: DataDir = Path(".llooma")) -> None:
    """Hosts holding a credential, with their public keys."""
    from llooma.credentials import CredentialStore

    for name, key in sorted(CredentialStore(data_dir / "credentials").hosts().items()):
        console.print(f"{name}\t{key}")


@app.command("migrate")
def migrate_command(database_url: Annotated[str, typer.Option(envvar="DATABASE_URL")]) -> None:
    """Apply pending database migrations."""
    from llooma.db.migrate import migrate

    applied = asyncio.run(migrate(database_url))
    console.print(f"applied: {', '.join(applied) or 'nothing (up to date)'}")


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="A small run, for a quick look")] = False,
    suite: Annotated[
        str, typer.Option(help="overhead, throughput, race, split, scheduling, engine or all")
    ] = "all",
    results_dir: Annotated[Path, typer.Option()] = Path("bench/results"),
) -> None:
    """Run the benchmarks on one embedded stack and write bench/results/ (md, json, png)."""
    from llooma.bench.suite import SUITES, run

    if suite != "all" and suite not in SUITES:
        raise typer.BadParameter(f"{suite!r}: choose from {', '.join(SUITES)} or all")
    run(list(SUITES) if suite == "all" else [suite], quick, results_dir, console)


if __name__ == "__main__":
    app()
