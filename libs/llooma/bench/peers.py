"""Peers benchmark: LLooMA beside the LiteLLM proxy, the gateway users would otherwise run, on the
same zero-latency HTTP upstream (`llooma.bench.upstream`), the same lean keep-alive client and
the same requests, interleaved in one run so that machine noise lands on all of them alike.

Measured per system: added time to first token at one stream (vs. the upstream called
directly), CPU per streamed request of every process the system runs (read from /proc through
psutil: for LLooMA every service, both `openai` host workers, nats-server and Postgres with its
backends; for LiteLLM its proxy and workers), and CPU at rest. The upstream's own CPU and the
client's are left out of both.

The LiteLLM proxy is installed once into its own virtual environment in the cache
(`LLOOMA_CACHE_DIR`, default `~/.cache/llooma`), never into the project's.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import uvloop
import yaml
from rich.progress import Progress

from llooma.bench import floor
from llooma.bench.sse_client import SseClient
from llooma.bench.stats import percentile
from llooma.host.config import HostConfig, ModelConfig
from llooma.processes import free_port, wait_for_port
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack

LITELLM_VERSION = "1.108.7"
MODEL = "bench-http"
LITELLM_KEY = "sk-bench-litellm"
CHUNKS = 16
PATH = "/v1/chat/completions"
HOST_NAMES = ("bench-http-1", "bench-http-2")


@dataclass(frozen=True)
class Sizes:
    ttft_rounds: int  # sequential requests per system at one stream
    cpu_requests: int  # requests per system for CPU per request
    cpu_concurrency: int
    idle_s: float


QUICK = Sizes(ttft_rounds=40, cpu_requests=200, cpu_concurrency=8, idle_s=5.0)
FULL = Sizes(ttft_rounds=400, cpu_requests=2000, cpu_concurrency=8, idle_s=20.0)


def cache_dir() -> Path:
    return Path(os.environ.get("LLOOMA_CACHE_DIR") or Path.home() / ".cache" / "llooma")


def litellm_binary() -> Path:
    """The `litellm` command of the pinned proxy, installed on first use (a venv is not
    relocatable, so it is installed in place and marked complete only at the end)."""
    venv = cache_dir() / "peers" / f"litellm-{LITELLM_VERSION}"
    complete = venv / ".complete"
    if not complete.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run(
            [*pip, "--disable-pip-version-check", f"litellm[proxy]=={LITELLM_VERSION}"],
            check=True,
        )
        complete.touch()
    return venv / "bin" / "litellm"


def bench_hosts(upstream_url: str) -> list[HostConfig]:
    """Two `openai` hosts in front of the same upstream, as two community hosts would be."""
    return [
        HostConfig(
            name=name,
            nats_url="nats://unused",
            models=[
                ModelConfig(
                    name=MODEL,
                    backend="openai",
                    base_url=upstream_url,
                    upstream_model="bench",
                    capacity=256,
                )
            ],
        )
        for name in HOST_NAMES
    ]


@dataclass
class System:
    name: str
    port: int
    api_key: str
    headers: dict[str, str] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    # Each process by name (LLooMA's): its CPU per request is reported on its own too.
    processes: dict[str, int] = field(default_factory=dict)
    ttft_s: list[float] = field(default_factory=list)
    cpu_ms_per_request: float = 0.0
    cpu_ms_by_process: dict[str, float] = field(default_factory=dict)
    idle_cpu_percent: float = 0.0


def _processes(pids: Iterable[int]) -> list[psutil.Process]:
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        for one in [process, *process.children(recursive=True)]:
            found[one.pid] = one
    return list(found.values())


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for process in _processes(pids):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def process_names(stack: Stack) -> dict[str, int]:
    """Each process of a running stack by name: its services and hosts, nats-server, Postgres
    (whose backends are its children)."""
    found = {child.name: child.process.pid for child in stack.children if child.process}
    if stack.nats is not None:
        found["nats-server"] = stack.nats.process.pid
    if stack.postgres is not None and (pid := stack.postgres.pid()) is not None:
        found["postgres"] = pid
    return found


def _body() -> bytes:
    return orjson.dumps(
        {
            "model": MODEL,
            "stream": True,
            "max_tokens": CHUNKS,
            "messages": [{"role": "user", "content": "Say something short, please."}],
        }
    )


async def _ttft_round(clients: dict[str, SseClient], systems: list[System], body: bytes) -> None:
    for system in systems:
        timing = await clients[system.name].timed_stream(PATH, body, system.headers)
        if timing.first_token is None:
            raise RuntimeError(f"{system.name} answered {timing.status} with no token")
        system.ttft_s.append(timing.first_token - timing.started)


async def _cpu_per_request(client: SseClient, system: System, body: bytes, sizes: Sizes) -> None:
    remaining = sizes.cpu_requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            timing = await client.timed_stream(PATH, body, system.headers)
            if timing.first_token is None:
                raise RuntimeError(f"{system.name} answered {timing.status} with no token")

    before = cpu_seconds(system.pids)
    each_before = {name: cpu_seconds([pid]) for name, pid in system.processes.items()}
    await asyncio.gather(*(worker() for _ in range(sizes.cpu_concurrency)))
    system.cpu_ms_per_request = (cpu_seconds(system.pids) - before) * 1000 / sizes.cpu_requests
    system.cpu_ms_by_process = {
        name: (cpu_seconds([pid]) - each_before[name]) * 1000 / sizes.cpu_requests
        for name, pid in system.processes.items()
    }


async def measure(systems: list[System], direct: System, sizes: Sizes, progress: Progress) -> None:
    body = _body()
    everyone = [direct, *systems]
    clients = {s.name: SseClient("127.0.0.1", s.port, s.api_key) for s in everyone}
    for _ in range(20):  # warm connections, caches and consumers
        await _ttft_round(clients, everyone, body)
    for system in everyone:
        system.ttft_s.clear()
    task = progress.add_task("peers: time to first token", total=sizes.ttft_rounds)
    for _ in range(sizes.ttft_rounds):
        await _ttft_round(clients, everyone, body)
        progress.advance(task)
    task = progress.add_task("peers: CPU per request", total=len(systems))
    for system in systems:
        await _cpu_per_request(clients[system.name], system, body, sizes)
        progress.advance(task)
    for client in clients.values():
        await client.close()
    await asyncio.sleep(2.0)  # let the last settlements and batches finish before rest
    rest = {s.name: cpu_seconds(s.pids) for s in systems}
    await asyncio.sleep(sizes.idle_s)
    for system in systems:
        used = cpu_seconds(system.pids) - rest[system.name]
        system.idle_cpu_percent = 100.0 * used / sizes.idle_s


def _start_upstream(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llooma.bench.upstream",
            "--port",
            str(port),
            "--chunks",
            str(CHUNKS),
        ]
    )
    wait_for_port(port, 30.0, process)
    return process


def _start_litellm(scratch: Path, upstream_url: str, port: int) -> subprocess.Popen[bytes]:
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": "openai/bench",
                    "api_base": upstream_url,
                    "api_key": "unused",
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_KEY},
        "litellm_settings": {"drop_params": True},
    }
    path = scratch / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    log = (scratch / "litellm.log").open("wb")
    process = subprocess.Popen(
        [str(litellm_binary()), "--config", str(path), "--port", str(port), "--num_workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"litellm exited; see {scratch / 'litellm.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=1).is_success:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("litellm did not become ready in 180 s")


def run(sizes: Sizes, progress: Progress) -> tuple[list[System], System]:
    """Start the upstream, LLooMA with two `openai` hosts and the LiteLLM proxy; measure."""
    litellm_binary()
    upstream_port = free_port()
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    with tempfile.TemporaryDirectory(prefix="llooma-peers-") as scratch_name:
        scratch = Path(scratch_name)
        upstream = _start_upstream(upstream_port)
        stack = Stack(
            root=scratch / "stack",
            http_port=free_port(),
            hosts=bench_hosts(upstream_url),
            extra_env={"LLOOMA_DUEL_FRACTION": "0"},
        )
        litellm: subprocess.Popen[bytes] | None = None
        floors = [
            floor.Floor(scratch / f"floor-{kind}", upstream_url, kind) for kind in floor.HAND_OFFS
        ]
        try:
            stack.start()
            for one in floors:
                one.start()
            litellm_port = free_port()
            litellm = _start_litellm(scratch, upstream_url, litellm_port)
            direct = System("upstream (direct)", upstream_port, "unused")
            systems = [
                System(
                    "LLooMA width 1",
                    stack.http_port,
                    DEV_API_KEY,
                    {"x-llooma-race-width": "1"},
                    stack.pids(),
                    process_names(stack),
                ),
                System(
                    "LLooMA width 2",
                    stack.http_port,
                    DEV_API_KEY,
                    {},
                    stack.pids(),
                    process_names(stack),
                ),
                System("LiteLLM proxy", litellm_port, LITELLM_KEY, {}, [litellm.pid]),
                *(_floor_system(one) for one in floors),
            ]
            uvloop.run(measure(systems, direct, sizes, progress))
            return systems, direct
        finally:
            if litellm is not None:
                litellm.terminate()
                litellm.wait(30)
            for one in floors:
                one.stop()
            stack.stop()
            upstream.terminate()
            upstream.wait(10)


def _floor_system(one: floor.Floor) -> System:
    """The floor's processes, its host named as the stack's first host is."""
    names = {
        (HOST_NAMES[0] if name == "host" else name): pid for name, pid in one.processes().items()
    }
    title = f"floor, {one.hand_offs} hand-offs"
    return System(title, one.http_port, floor.API_KEY, {}, list(names.values()), names)


def summary(system: System, direct: System) -> dict[str, Any]:
    added = [1000 * (a - b) for a, b in zip(system.ttft_s, direct.ttft_s, strict=True)]
    return {
        "system": system.name,
        "ttft_p50_ms": 1000 * statistics.median(system.ttft_s),
        "added_ttft_p50_ms": statistics.median(added),
        "added_ttft_p99_ms": percentile(added, 0.99),
        "cpu_ms_per_request": system.cpu_ms_per_request,
        "cpu_ms_by_process": system.cpu_ms_by_process,
        "idle_cpu_percent_of_a_core": system.idle_cpu_percent,
    }


def by_process_table(systems: list[System]) -> str:
    """One row per process of any system, one column per system, busiest in the first system
    first, and their total."""
    first = systems[0].cpu_ms_by_process
    names = sorted(
        {name for system in systems for name in system.cpu_ms_by_process},
        key=lambda name: (-first.get(name, 0.0), name),
    )
    lines = [
        "| process | " + " | ".join(s.name for s in systems) + " |",
        "| --- |" + " ---: |" * len(systems),
    ]
    for name in names:
        cells = " | ".join(f"{s.cpu_ms_by_process.get(name, 0.0):.2f}" for s in systems)
        lines.append(f"| {name} | {cells} |")
    totals = " | ".join(f"{sum(s.cpu_ms_by_process.values()):.2f}" for s in systems)
    lines.append(f"| total | {totals} |")
    return "\n".join(lines)


def write_results(systems: list[System], direct: System, results_dir: Path, note: str) -> str:
    rows = [summary(system, direct) for system in systems]
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "peers.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| system | added TTFT p50 / p99 (ms), 1 stream | CPU per streamed request (ms) "
        "| CPU at rest (% of a core) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['system']} | {row['added_ttft_p50_ms']:.1f} / {row['added_ttft_p99_ms']:.1f} "
            f"| {row['cpu_ms_per_request']:.1f} | {row['idle_cpu_percent_of_a_core']:.1f} |"
        )
    by_name = {str(row["system"]): row for row in rows}
    peer = float(by_name["LiteLLM proxy"]["cpu_ms_per_request"])
    ratios = ", ".join(
        f"{name}: {peer / float(row['cpu_ms_per_request']):.1f}x less CPU per request"
        for name, row in by_name.items()
        if name.startswith("LLooMA") and float(row["cpu_ms_per_request"]) > 0
    )
    floors = [row for name, row in by_name.items() if name.startswith("floor")]
    stack = float(by_name["LLooMA width 1"]["cpu_ms_per_request"])
    above_floor = ", ".join(
        f"{stack / float(row['cpu_ms_per_request']):.2f}x the {row['system']}"
        for row in floors
        if float(row["cpu_ms_per_request"]) > 0
    )
    table = "\n".join(lines)
    direct_p50 = 1000 * statistics.median(direct.ttft_s)
    split = [system for system in systems if system.cpu_ms_by_process]
    text = (
        "# Peers: LLooMA beside the LiteLLM proxy on one HTTP upstream\n\n"
        f"{note}\n\n{table}\n\nAgainst LiteLLM {LITELLM_VERSION}: {ratios}. "
        f"CPU per request of LLooMA width 1: {above_floor}.\n\n"
        f"The upstream (`llooma.bench.upstream`, {CHUNKS} streamed chunks, no delay) answers "
        f"its first token in {direct_p50:.2f} ms p50 when called directly; `added` is each "
        "system's time to first token minus the direct call's in the same round (the systems "
        "take turns, request by request, on keep-alive connections of one lean SSE client). "
        "CPU per request: user + system time of every process of the system (LLooMA: its eight "
        "services, two `openai` hosts, nats-server, Postgres and its backends; LiteLLM: the "
        "proxy and its workers, no database, logging at ERROR; a floor: its six processes, "
        "nats-server and Postgres) over "
        "requests at 8 concurrent streams, divided by their number. At rest: the same "
        "processes, idle, after the load. The upstream's and the client's CPU count for "
        "neither.\n\n"
        "The floors (`llooma.bench.floor`) are the stack's shape with no logic in it: the same "
        "processes and hops as a directly routed request at width 1 (ingress, privacy, "
        "dispatcher, racer, one `openai` host on the host's own HTTP client, accounting "
        "writing settlements to Postgres), each doing only what it cannot leave out. With "
        "JetStream hand-offs they are what the design's shape costs before any of LLooMA's "
        "own work; with core request-reply hand-offs, what that redesign could at best save.\n"
    )
    if split:
        text += (
            "\n## CPU per streamed request by process (ms)\n\n"
            "The same requests, each process's own user + system time (Postgres with its "
            "backends).\n\n" + by_process_table(split) + "\n"
        )
    (results_dir / "peers.md").write_text(text)
    return table
