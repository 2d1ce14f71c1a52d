"""`llooma engine`: build the real engine once per machine, or serve it for a host to use."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from llooma.engine._build import engine_paths, ensure_engine
from llooma.engine._server import UPSTREAM_MODEL, LlamaServer

engine_app = typer.Typer(help="llama.cpp's llama-server and Gemma 3 270M, cached per machine.")
console = Console()


@engine_app.command("build")
def build() -> None:
    """Build llama-server and assemble the model into the cache (quick when both are there)."""
    started = time.monotonic()
    try:
        paths = ensure_engine(print)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        console.print(f"[red]could not build the engine:[/red] {error}")
        raise typer.Exit(1) from error
    # Plain print: rich would wrap the long paths mid-line.
    print(f"engine: {paths.server}\nmodel:  {paths.model} ({time.monotonic() - started:.1f} s)")


@engine_app.command("path")
def path() -> None:
    """Print where the engine is cached (LLOOMA_ENGINE_DIR, else ~/.cache/llooma/engine)."""
    paths = engine_paths()
    console.print(f"{paths.root}\t{'built' if paths.ready() else 'not built'}", highlight=False)


@engine_app.command("serve")
def serve(
    port: Annotated[int, typer.Option(help="Loopback port")] = 8000,
    threads: Annotated[int, typer.Option(help="Decoding threads (more only on idle cores)")] = 1,
    ctx_size: Annotated[int, typer.Option(help="Total context, shared by the slots")] = 4096,
    parallel: Annotated[int, typer.Option(help="Slots (requests decoded together)")] = 2,
    log: Annotated[Path, typer.Option()] = Path(".llooma/logs/llama-server.log"),
) -> None:
    """Run llama-server with the model on 127.0.0.1:PORT until Ctrl-C (builds it if needed)."""
    paths = ensure_engine(lambda line: console.print(line, highlight=False))
    server = LlamaServer(
        paths, log, port=port, threads=threads, ctx_size=ctx_size, parallel=parallel
    )
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server.start()
    console.print(
        f"llama-server on {server.base_url} (log: {log}); a host's model entry:\n\n"
        f"  - name: {UPSTREAM_MODEL}\n"
        "    backend: openai\n"
        f"    base_url: {server.openai_url}\n"
        f"    upstream_model: {UPSTREAM_MODEL}\n"
        f"    metrics_url: {server.metrics_url}\n"
        f"    capacity: {parallel * 2}\n\n"
        "Ctrl-C stops it.",
        highlight=False,
    )
    try:
        while not stopping and server.running():
            time.sleep(0.5)
    finally:
        server.stop()
