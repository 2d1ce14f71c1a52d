"""The host's upstream HTTP client: CPU per streamed request, and connections after cancelled
races, for the clients a host could use against a fast OpenAI-compatible engine.

    .venv/bin/python -m llooma.bench.host_upstream [--requests 2000] [--races 20000]

The engine is a minimal streaming server in its own process (16 content chunks, a usage chunk,
[DONE]), so only the client's CPU is counted (time.process_time of this process). A race
starts two streams at once; the first to get a token wins and the other is cancelled (a quarter
of losers are cancelled at once, while connecting or sending, the rest when the winner has its
first token, so while waiting for headers or mid-stream), then the winner is read to its end.
Writes bench/results/host_upstream.md.

Its size (~650 lines): one benchmark with its three clients, its fake engine and its report;
not on any service's path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import multiprocessing
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import uvloop
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from llooma import bus, subjects
from llooma.embedded import EmbeddedNats
from llooma.host.openai_backend import GenerationDefaults, OpenAIBackend
from llooma.v1.common_pb2 import ChatMessage, GenerationParams
from llooma.v1.host_pb2 import CancelTask, HostChunk, HostTask

TOKENS = 16
RESULT = Path("bench/results/host_upstream.md")

# -- the engine ---------------------------------------------------------------------------------


def _event(payload: dict[str, Any]) -> bytes:
    data = b"data: " + orjson.dumps(payload) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


_CHUNKS = [
    _event({"choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}]})
    for i in range(TOKENS)
]
_TAIL = (
    _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
    + _event({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": TOKENS}})
    + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
)
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class _EngineStats:
    open = 0
    accepted = 0
    peak = 0
    # Seconds between groups of 4 tokens (0: as fast as the loop turns).
    pause_s = 0.0


async def _engine_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    stats = _EngineStats
    stats.open += 1
    stats.accepted += 1
    stats.peak = max(stats.peak, stats.open)
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            length = 0
            while (header := await reader.readline()) not in (b"\r\n", b""):
                if header[:15].lower() == b"content-length:":
                    length = int(header[15:])
            await reader.readexactly(length)
            if line.startswith(b"GET /stats"):
                body = json.dumps(
                    {"open": stats.open, "accepted": stats.accepted, "peak": stats.peak}
                ).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                continue
            writer.write(_HEAD)
            # Tokens in a few writes with yields between, as an engine streams them.
            for start in range(0, TOKENS, 4):
                writer.write(b"".join(_CHUNKS[start : start + 4]))
                await writer.drain()
                await asyncio.sleep(stats.pause_s)
            writer.write(_TAIL)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, RuntimeError):
        # RuntimeError: uvloop's write to a connection the client already closed.
        return
    finally:
        stats.open -= 1
        writer.close()


def _run_engine(sock: socket.socket, pause_s: float) -> None:
    _EngineStats.pause_s = pause_s

    async def serve() -> None:
        server = await asyncio.start_server(_engine_connection, sock=sock, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(serve())


# -- the clients --------------------------------------------------------------------------------

Stream = Callable[[], AsyncIterator[str]]


@dataclass
class Client:
    name: str
    stream: Stream
    connections: Callable[[], int]
    close: Callable[[], Awaitable[None]]


def _task() -> HostTask:
    return HostTask(
        attempt_id="bench",
        model="m",
        messages=[ChatMessage(role="user", content="Say something.")],
        params=GenerationParams(max_tokens=TOKENS),
    )


def llooma_client(base_url: str) -> Client:
    backend = OpenAIBackend(
        base_url, None, "m", defaults=GenerationDefaults(max_tokens=TOKENS), max_connections=16
    )
    task = _task()
    return Client(
        "llooma HttpPool (OpenAIBackend)",
        lambda: backend.stream(task),
        lambda: backend.pool.open_connections,
        backend.aclose,
    )


def httpx_client(base_url: str) -> Client:
    """What the host did before: httpx streaming, aiter_lines, json per data line."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(300.0))
    url = base_url + "/chat/completions"
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Say something."}],
        "stream": True,
        "max_tokens": TOKENS,
    }

    async def stream() -> AsyncIterator[str]:
        async with client.stream("POST", url, json=body) as response:
            async for raw in response.aiter_lines():
                line = raw.strip()
                if not line.startswith("data:"):
                    continue
                value = line[5:].strip()
                if value == "[DONE]":
                    return
                choices = json.loads(value).get("choices")
                if choices:
                    content = choices[0].get("delta", {}).get("content")
                    if content:
                        yield content

    def connections() -> int:
        pool = client._transport._pool  # type: ignore[attr-defined]
        return len(pool.connections)

    return Client("httpx 0.28 (the host's old path)", stream, connections, client.aclose)


def aiohttp_client(base_url: str) -> Client | None:
    try:
        aiohttp: Any = importlib.import_module("aiohttp")
    except ImportError:
        return None
    connector = aiohttp.TCPConnector(limit=16)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
    url = base_url + "/chat/completions"
    body = orjson.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Say something."}],
            "stream": True,
            "max_tokens": TOKENS,
        }
    )

    async def stream() -> AsyncIterator[str]:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            async for raw in response.content:
                if not raw.startswith(b"data:"):
                    continue
                value = raw[5:].strip()
                if value == b"[DONE]":
                    return
                choices = orjson.loads(value).get("choices")
                if choices:
                    content = choices[0].get("delta", {}).get("content")
                    if content:
                        yield content

    def connections() -> int:
        return sum(len(v) for v in connector._conns.values()) + len(connector._acquired)

    return Client(f"aiohttp {aiohttp.__version__}", stream, connections, lambda: session.close())


# -- the measurements ---------------------------------------------------------------------------


async def _engine_stats(port: int) -> dict[str, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readline()
    length = 0
    while (header := await reader.readline()) != b"\r\n":
        if header.lower().startswith(b"content-length:"):
            length = int(header[15:])
    stats: dict[str, int] = json.loads(await reader.readexactly(length))
    writer.close()
    # This connection itself is still counted by the engine.
    stats["open"] -= 1
    return stats


async def _consume(
    stream: AsyncIterator[str], first: asyncio.Future[int] | None = None, me: int = 0
) -> int:
    count = 0
    async for _ in stream:
        count += 1
        if first is not None and not first.done():
            first.set_result(me)
    return count


async def per_request_cpu(client: Client, requests: int) -> float:
    """CPU ms per streamed request, sequential."""
    for _ in range(50):
        await _consume(client.stream())
    started = time.process_time()
    for _ in range(requests):
        assert await _consume(client.stream()) == TOKENS
    return (time.process_time() - started) * 1000 / requests


@dataclass
class RaceWindow:
    races: int
    cpu_ms_per_race: float
    client_connections: int
    engine_connections: int
    engine_accepted: int


@dataclass
class RaceRun:
    client: str
    windows: list[RaceWindow] = field(default_factory=list)
    failed: str = ""


async def races(client: Client, port: int, total: int, window: int, seed: int) -> RaceRun:
    rng = random.Random(seed)
    run = RaceRun(client.name)
    done = 0
    while done < total:
        started = time.process_time()
        loop = asyncio.get_running_loop()
        for _ in range(window):
            first: asyncio.Future[int] = loop.create_future()
            pair = (
                asyncio.create_task(_consume(client.stream(), first, 0)),
                asyncio.create_task(_consume(client.stream(), first, 1)),
            )
            if rng.random() < 0.25:
                await asyncio.sleep(0)
                won = 0
            else:
                try:
                    won = await asyncio.wait_for(first, 10)
                except TimeoutError:
                    run.failed = f"no first token within 10 s after {done} races"
                    return run
            # The other is cancelled wherever it is: connecting, sending, waiting, streaming.
            winner, loser = pair[won], pair[1 - won]
            loser.cancel()
            try:
                await asyncio.wait_for(winner, 10)
            except TimeoutError:
                run.failed = f"a race's winner did not finish within 10 s after {done} races"
                return run
            except Exception as error:
                run.failed = f"{error!r} after {done} races"
                return run
            with contextlib.suppress(asyncio.CancelledError):
                await loser
            done += 1
        cpu = (time.process_time() - started) * 1000 / window
        await asyncio.sleep(0.05)
        stats = await _engine_stats(port)
        run.windows.append(
            RaceWindow(done, cpu, client.connections(), stats["open"], stats["accepted"])
        )
    return run


# -- through a host worker --------------------------------------------------------------------

HOST = "bench-upstream-host"
MODEL = "bench-upstream"


@dataclass
class HostWindow:
    races: int
    host_cpu_ms_per_race: float
    engine_connections: int
    engine_accepted: int
    host_rss_mb: float
    # A fresh request's time to its first token, after the window.
    answer_ms: float


@dataclass
class HostRun:
    windows: list[HostWindow] = field(default_factory=list)
    failed: str = ""
    sigterm_exit_s: float | None = None


class _Attempts:
    """Reply streams by inbox, on one subscription."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self.first: dict[str, asyncio.Future[str]] = {}
        self.ended: dict[str, asyncio.Future[str]] = {}

    async def start(self) -> None:
        await self._nc.subscribe(self._prefix + ".*", cb=self._on_chunk)

    async def _on_chunk(self, msg: Msg) -> None:
        chunk = HostChunk.FromString(msg.data)
        kind = chunk.WhichOneof("event")
        key = msg.subject
        if kind == "token":
            first = self.first.get(key)
            if first is not None and not first.done():
                first.set_result(key)
        elif kind in ("finished", "failed"):
            ended = self.ended.get(key)
            if ended is not None and not ended.done():
                ended.set_result(kind if kind == "finished" else chunk.failed.message)

    async def send(self, first: asyncio.Future[str]) -> tuple[str, str]:
        """Sends one task; returns (attempt id, reply subject)."""
        attempt_id = uuid.uuid4().hex
        reply = f"{self._prefix}.{attempt_id}"
        self.first[reply] = first
        self.ended[reply] = asyncio.get_running_loop().create_future()
        task = HostTask(
            attempt_id=attempt_id,
            model=MODEL,
            messages=[ChatMessage(role="user", content="Say something.")],
            params=GenerationParams(max_tokens=TOKENS),
        )
        await self._nc.publish(
            subjects.host_task(MODEL, HOST), task.SerializeToString(), reply=reply
        )
        return attempt_id, reply

    def forget(self, reply: str) -> None:
        self.first.pop(reply, None)
        self.ended.pop(reply, None)


def _start_host(config: Path) -> subprocess.Popen[bytes]:
    llooma = Path(sys.executable).parent / "llooma"
    return subprocess.Popen([str(llooma), "host", "--config", str(config)])


async def host_races(total: int, window: int, seed: int, root: Path) -> HostRun:
    # Streams of ~8 ms, so that most cancels land while the loser is still streaming.
    engine, port = _start_engine(pause_s=0.002)
    nats = EmbeddedNats.start(root / "nats")
    config = root / "host.yaml"
    config.write_text(
        json.dumps(
            {
                "name": HOST,
                "nats_url": nats.url,
                "models": [
                    {
                        "name": MODEL,
                        "backend": "openai",
                        "base_url": f"http://127.0.0.1:{port}/v1",
                        "capacity": 8,
                    }
                ],
            }
        )
    )
    host = _start_host(config)
    run = HostRun()
    nc = await bus.connect(nats.url, "bench-host-upstream")
    try:
        beat = asyncio.get_running_loop().create_future()

        async def on_beat(_msg: Msg) -> None:
            if not beat.done():
                beat.set_result(None)

        await nc.subscribe(subjects.kv_put_subject(subjects.HOSTS_BUCKET, HOST), cb=on_beat)
        await asyncio.wait_for(beat, 30)
        attempts = _Attempts(nc)
        await attempts.start()
        process = psutil.Process(host.pid)
        rng = random.Random(seed)
        loop = asyncio.get_running_loop()
        done = 0
        while done < total:
            cpu = process.cpu_times()
            started = cpu.user + cpu.system
            for _ in range(window):
                first: asyncio.Future[str] = loop.create_future()
                a = await attempts.send(first)
                b = await attempts.send(first)
                try:
                    if rng.random() < 0.25:
                        winner, loser = a, b
                    else:
                        won = await asyncio.wait_for(first, 10)
                        winner, loser = (a, b) if won == a[1] else (b, a)
                    cancel = CancelTask(attempt_id=loser[0])
                    await nc.publish(subjects.host_cancel(HOST), cancel.SerializeToString())
                    ended = await asyncio.wait_for(attempts.ended[winner[1]], 10)
                except TimeoutError:
                    run.failed = f"the host did not answer within 10 s after {done} races"
                    return run
                if ended != "finished":
                    run.failed = f"a winner failed after {done} races: {ended}"
                    return run
                attempts.forget(a[1])
                attempts.forget(b[1])
                done += 1
            cpu = process.cpu_times()
            used = (cpu.user + cpu.system - started) * 1000 / window
            await asyncio.sleep(0.2)
            first = loop.create_future()
            asked = time.perf_counter()
            probe = await attempts.send(first)
            await asyncio.wait_for(first, 10)
            answer_ms = (time.perf_counter() - asked) * 1000
            await asyncio.wait_for(attempts.ended[probe[1]], 10)
            attempts.forget(probe[1])
            stats = await _engine_stats(port)
            run.windows.append(
                HostWindow(
                    done,
                    used,
                    stats["open"],
                    stats["accepted"],
                    process.memory_info().rss / 1e6,
                    answer_ms,
                )
            )
            print(f"  host: {run.windows[-1]}")
        signalled = time.perf_counter()
        host.send_signal(signal.SIGTERM)
        await asyncio.get_running_loop().run_in_executor(None, host.wait, 30)
        run.sigterm_exit_s = time.perf_counter() - signalled
        return run
    finally:
        await nc.close()
        if host.poll() is None:
            host.kill()
            host.wait()
        nats.stop()
        engine.kill()
        engine.join()


def _start_engine(pause_s: float = 0.0) -> tuple[multiprocessing.process.BaseProcess, int]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    process = multiprocessing.get_context("fork").Process(
        target=_run_engine, args=(sock, pause_s), daemon=True
    )
    process.start()
    sock.close()
    return process, port


async def main(
    requests: int, total_races: int, httpx_races: int, window: int, host_races_total: int
) -> str:
    lines: list[str] = []
    host_run: HostRun | None = None
    if host_races_total:
        with tempfile.TemporaryDirectory() as root:
            host_run = await host_races(host_races_total, max(window, 2000), 2, Path(root))
    cpu_rows: list[tuple[str, float]] = []
    race_runs: list[RaceRun] = []
    makers: list[tuple[Callable[[str], Client | None], int]] = [
        (llooma_client, total_races),
        (httpx_client, httpx_races),
        (aiohttp_client, httpx_races),
    ]
    for make, race_count in makers:
        engine, port = _start_engine()
        await asyncio.sleep(0.3)
        try:
            client = make(f"http://127.0.0.1:{port}/v1")
            if client is None:
                continue
            if not race_count and make is not llooma_client:
                await client.close()
                continue
            cpu_rows.append((client.name, await per_request_cpu(client, requests)))
            print(f"{client.name}: {cpu_rows[-1][1]:.3f} ms CPU per streamed request")
            run = await races(client, port, race_count, window, seed=1)
            race_runs.append(run)
            last = run.windows[-1] if run.windows else None
            print(f"  races: {last} {run.failed}")
            await client.close()
        finally:
            engine.kill()
            engine.join()
    lines.append("# The host's upstream HTTP client")
    lines.append("")
    lines.append(
        f"`.venv/bin/python -m llooma.bench.host_upstream --requests {requests} "
        f"--races {total_races} --httpx-races {httpx_races} --host-races {host_races_total}` "
        f"({platform.python_implementation()} {platform.python_version()}, uvloop, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}). "
        f"A fast local engine in its own process streams {TOKENS} content chunks, a usage "
        "chunk and [DONE]; only this process's CPU is counted."
    )
    lines.append("")
    lines.append("## CPU per streamed request (sequential, read to the end)")
    lines.append("")
    lines.append("| client | CPU ms / request |")
    lines.append("|---|---:|")
    for name, cpu in cpu_rows:
        lines.append(f"| {name} | {cpu:.3f} |")
    lines.append("")
    lines.append("## Cancelled races at width 2")
    lines.append("")
    lines.append(
        "Each race: two streams; the loser is cancelled (25% at once, while connecting or "
        "sending; otherwise when the winner has its first token). Sampled after each window: "
        "CPU per race in that window, the client's open connections, the engine's open "
        "connections and the connections it accepted so far."
    )
    for run in race_runs:
        if not run.windows and not run.failed:
            continue
        lines.append("")
        lines.append(f"### {run.client}")
        lines.append("")
        lines.append(
            "| races | CPU ms / race | client connections | engine connections | accepted |"
        )
        lines.append("|---:|---:|---:|---:|---:|")
        for w in run.windows:
            lines.append(
                f"| {w.races} | {w.cpu_ms_per_race:.3f} | {w.client_connections} | "
                f"{w.engine_connections} | {w.engine_accepted} |"
            )
        if run.failed:
            lines.append("")
            lines.append(f"Stopped: {run.failed}.")
    if host_run is not None:
        lines.append("")
        lines.append("## Cancelled races through a host worker")
        lines.append("")
        lines.append(
            "A `llooma host` process (openai backend, capacity 8) on an embedded NATS, in front "
            "of the same engine; each race sends two tasks to it over NATS and a CancelTask for "
            "the loser, as the racer does. Sampled after each window: the host process's CPU "
            "per race, the engine's open connections and accepted connections so far, the "
            "host's RSS, and a fresh request's time to first token."
        )
        lines.append("")
        lines.append(
            "| races | host CPU ms / race | engine connections | accepted | host RSS MB | TTFT ms |"
        )
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for h in host_run.windows:
            lines.append(
                f"| {h.races} | {h.host_cpu_ms_per_race:.3f} | {h.engine_connections} | "
                f"{h.engine_accepted} | {h.host_rss_mb:.0f} | {h.answer_ms:.1f} |"
            )
        lines.append("")
        if host_run.failed:
            lines.append(f"Stopped: {host_run.failed}.")
        if host_run.sigterm_exit_s is not None:
            lines.append(
                f"After the races, SIGTERM: the host exited in {host_run.sigterm_exit_s:.2f} s."
            )
    return "\n".join(lines) + "\n"


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--races", type=int, default=20_000)
    parser.add_argument("--httpx-races", type=int, default=5_000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--host-races", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    report = uvloop.run(
        main(args.requests, args.races, args.httpx_races, args.window, args.host_races)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)


if __name__ == "__main__":
    cli()
