"""The benchmark suite: every chosen suite's hosts on one embedded stack, suites in turn.

One stack serves them all (each suite has its own models and hosts, and only per-model knobs),
so the stack starts once; that is most of what keeps `--quick` under two minutes.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvloop
from rich.console import Console
from rich.progress import Progress

from llooma.bench import (
    engine,
    engine_path,
    overhead,
    peers,
    race,
    scheduling,
    split,
    throughput,
)
from llooma.engine import LlamaServer
from llooma.host.config import HostConfig
from llooma.processes import free_port
from llooma.stack import Stack

SUITES = (
    "overhead",
    "throughput",
    "race",
    "split",
    "scheduling",
    "engine",
    "engine-path",
    "peers",
)
# Suites that bring their own processes (an HTTP upstream, a peer gateway) and stack.
OWN_STACK = ("engine-path", "peers")
# The stack sets each host's NATS URL itself.
_UNUSED_URL = "nats://unused"

Result = TypeVar("Result")


@dataclass(frozen=True)
class Sizes:
    overhead_plan: list[tuple[int, int]]
    throughput_plan: throughput.SearchPlan
    race_requests: int
    split_requests: int
    scheduling_scale: float
    scheduling_seeds: list[int]
    engine_requests: int
    engine_path_requests: int


QUICK = Sizes(
    overhead_plan=[(1, 60), (32, 320), (128, 256)],
    throughput_plan=throughput.QUICK,
    race_requests=100,
    split_requests=4,
    scheduling_scale=scheduling.QUICK_SCALE,
    scheduling_seeds=[1],
    engine_requests=10,
    engine_path_requests=10,
)
FULL = Sizes(
    overhead_plan=[(1, 500), (32, 3200), (128, 6400)],
    throughput_plan=throughput.FULL,
    race_requests=2000,
    split_requests=100,
    scheduling_scale=scheduling.FULL_SCALE,
    scheduling_seeds=[1, 2, 3],
    engine_requests=60,
    engine_path_requests=40,
)


def stack_parts(
    suites: list[str], sizes: Sizes, servers: list[LlamaServer]
) -> tuple[list[HostConfig], dict[str, str]]:
    hosts: list[HostConfig] = []
    env: dict[str, str] = {}
    if "overhead" in suites or "throughput" in suites:
        hosts += overhead.bench_hosts(_UNUSED_URL)
    if "race" in suites:
        hosts += race.bench_hosts(_UNUSED_URL)
        env.update(race.stack_env())
    if "split" in suites:
        hosts += split.bench_hosts(_UNUSED_URL)
    if "scheduling" in suites:
        hosts += scheduling.bench_hosts(_UNUSED_URL, sizes.scheduling_scale)
    if "engine" in suites:
        hosts += engine.bench_hosts(_UNUSED_URL, servers)
    return hosts, env


def run(suites: list[str], quick: bool, results_dir: Path, console: Console) -> None:
    sizes = QUICK if quick else FULL
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    note = (
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, "
        f"{os.cpu_count()} cores (load average {load} when the run began), "
        f"Python {platform.python_version()}; {'quick' if quick else 'full'} run "
        f"(`llooma bench{' --quick' if quick else ''}"
        f"{'' if len(suites) == len(SUITES) else f' --suite {suites[0]}'}`), one stack "
        "shared by the suites, client and stack on the same machine."
    )
    started = time.monotonic()
    shared = [name for name in suites if name not in OWN_STACK]
    if shared:
        _run_shared(shared, sizes, results_dir, note, console)
    if "engine-path" in suites:
        with tempfile.TemporaryDirectory(prefix="llooma-bench-path-") as scratch:
            path = Path(scratch)
            with engine.engines(path / "logs", lambda line: console.print(line)) as servers:
                times = uvloop.run(engine_path.run(path, servers, sizes.engine_path_requests))
        table = engine_path.write_results(times, results_dir, note)
        console.print(f"[bold]engine-path[/bold]\n{table}")
    if "peers" in suites:
        with Progress(console=console) as progress:
            peer_sizes = peers.QUICK if quick else peers.FULL
            systems, direct = peers.run(peer_sizes, progress)
        table = peers.write_results(systems, direct, results_dir, note)
        console.print(f"[bold]peers[/bold]\n{table}")
    console.print(f"results in {results_dir}/ after {time.monotonic() - started:.0f} s")


def _run_shared(
    suites: list[str], sizes: Sizes, results_dir: Path, note: str, console: Console
) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llooma-bench-") as scratch, ExitStack() as later:
        servers: list[LlamaServer] = []
        if "engine" in suites:
            # The real engines start before the stack, so their hosts find them at once.
            servers = later.enter_context(
                engine.engines(Path(scratch) / "logs", lambda line: console.print(line))
            )
        hosts, env = stack_parts(suites, sizes, servers)
        stack = Stack(
            root=Path(scratch),
            http_port=free_port(),
            nats_url=os.environ.get("NATS_URL") or None,
            database_url=os.environ.get("DATABASE_URL") or None,
            hosts=hosts,
            extra_env=env,
        )
        console.print(f"starting a bench stack with {len(hosts)} hosts for: {', '.join(suites)}")
        stack.start()
        console.print(f"stack ready after {time.monotonic() - started:.0f} s")
        try:
            with Progress(console=console) as progress:
                _run_suites(stack, servers, suites, sizes, results_dir, note, console, progress)
        finally:
            stack.stop()


def _measure(coroutine: Coroutine[Any, Any, Result]) -> Result:
    return uvloop.run(coroutine)


def _run_suites(
    stack: Stack,
    servers: list[LlamaServer],
    suites: list[str],
    sizes: Sizes,
    results_dir: Path,
    note: str,
    console: Console,
    progress: Progress,
) -> None:
    writers: dict[str, Callable[[], str]] = {
        "overhead": lambda: overhead.write_results(
            _measure(overhead.measure(stack, sizes.overhead_plan, progress)), results_dir, note
        ),
        "throughput": lambda: throughput.write_results(
            _measure(throughput.measure(stack, sizes.throughput_plan, progress)),
            results_dir,
            note,
        ),
        "race": lambda: race.write_results(
            _measure(race.measure(stack, sizes.race_requests, progress)), results_dir, note
        ),
        "split": lambda: split.write_results(
            _measure(split.measure(stack, sizes.split_requests, progress)), results_dir, note
        ),
        "scheduling": lambda: scheduling.write_results(
            _measure(
                scheduling.measure(stack, sizes.scheduling_scale, sizes.scheduling_seeds, progress)
            ),
            results_dir,
            note,
        ),
        "engine": lambda: engine.write_results(
            _measure(engine.measure(stack, servers, sizes.engine_requests, progress)),
            results_dir,
            note,
        ),
    }
    for name in suites:
        began = time.monotonic()
        table = writers[name]()
        console.print(f"[bold]{name}[/bold] ({time.monotonic() - began:.0f} s)\n{table}")
