"""Where the stack's added time to first token goes on a real engine, request by request.

    .venv/bin/python -m llooma.bench.engine_path [--requests 30] [--way-back]

(`llooma bench --suite engine-path` runs it as part of the bench, writing
bench/results/engine_path.md.)

`llooma bench --suite engine` reports `added` as a difference of two medians, stack minus
direct, each dominated by the engine's own TTFT (tens to hundreds of ms under load), so its
noise hides a control plane that costs a few ms. Here a TCP relay in this process sits in front
of each llama-server and notes when each chat request reaches the engine and when the engine
sends its first content; subtracting that engine time from each request's client TTFT leaves
the time spent outside the engine, per request. A core-NATS subscriber notes when each pipeline
hop's message and the host task pass, on the same clock; with --way-back also the host's first
token and the racer's first events, timed from the engine's first content. Direct requests go
through the same relay, so both paths pay it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvloop
from nats.aio.msg import Msg

from llooma import bus, subjects
from llooma.bench import engine
from llooma.bench.sse_client import Refused, SseClient, TextTiming
from llooma.engine import UPSTREAM_MODEL, LlamaServer
from llooma.host.config import Generation, HostConfig, ModelConfig
from llooma.processes import free_port
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack
from llooma.v1.host_pb2 import HostChunk
from llooma.v1.pipeline_pb2 import ClientEvent

_FIRST_CONTENT = re.compile(rb'"content": ?"[^"]')
_CHAT = b"POST /v1/chat/completions"
_WARM_UP = 6
# The labels of what passes after the engine answered (--way-back).
_WAY_BACK = ("host's", "racer's")


class EngineRelay:
    """A TCP relay in front of one llama-server: (request in, first content out) per chat
    request, in this process's perf_counter clock."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.exchanges: list[tuple[float, float]] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        asked: list[float] = []

        async def to_engine() -> None:
            try:
                while data := await client_r.read(65_536):
                    if data.startswith(_CHAT):
                        asked.append(time.perf_counter())
                    upstream_w.write(data)
            finally:
                upstream_w.close()

        async def to_client() -> None:
            try:
                while data := await upstream_r.read(65_536):
                    if asked and _FIRST_CONTENT.search(data):
                        self.exchanges.append((asked.pop(), time.perf_counter()))
                    client_w.write(data)
            finally:
                client_w.close()

        await asyncio.gather(to_engine(), to_client(), return_exceptions=True)


@dataclass
class PathTimes:
    ttft_ms: list[float] = field(default_factory=list)
    # Client TTFT minus the engine's own: the time spent outside the engine.
    outside_ms: list[float] = field(default_factory=list)
    to_engine_ms: list[float] = field(default_factory=list)
    from_engine_ms: list[float] = field(default_factory=list)
    # The stack only: when each hop's message passed, on the way in after the client sent the
    # request, on the way back after the engine sent its first content.
    hops_ms: dict[str, list[float]] = field(default_factory=dict)
    back_ms: dict[str, list[float]] = field(default_factory=dict)


def relayed_hosts(relays: list[EngineRelay], servers: list[LlamaServer]) -> list[HostConfig]:
    return [
        HostConfig(
            name=f"bench-engine-{key}",
            nats_url="nats://unused",
            models=[
                ModelConfig(
                    name=engine.MODEL,
                    backend="openai",
                    base_url=f"http://127.0.0.1:{relay.port}/v1",
                    upstream_model=UPSTREAM_MODEL,
                    metrics_url=server.metrics_url,
                    capacity=4,
                    generation=Generation(max_tokens=1024),
                )
            ],
        )
        for key, relay, server in zip("ab", relays, servers, strict=True)
    ]


async def measure(
    stack: Stack, relays: list[EngineRelay], requests: int, *, way_back: bool = False
) -> dict[str, PathTimes]:
    assert stack.nats_url is not None
    nc = await bus.connect(stack.nats_url, "llooma-bench-path", nkey_seed_file=stack.control_seed)
    passed: list[tuple[str, float]] = []

    async def note(msg: Msg) -> None:
        passed.append((msg.subject, time.perf_counter()))

    async def note_host_chunk(msg: Msg) -> None:
        if HostChunk.FromString(msg.data).HasField("token"):
            passed.append(("host's first token", time.perf_counter()))

    async def note_client_event(msg: Msg) -> None:
        kind = ClientEvent.FromString(msg.data).WhichOneof("event")
        if kind in ("started", "delta"):
            passed.append((f"racer's {kind} event", time.perf_counter()))

    await nc.subscribe(subjects.PIPELINE_SUBJECTS, cb=note)
    await nc.subscribe(subjects.HOST_TASKS_ANY, cb=note)
    if way_back:
        # Off by default: this process is also the client, and decoding every host chunk and
        # client event here lands in the very window the client's first content is timed in.
        await nc.subscribe(subjects.HOST_REPLIES_ANY, cb=note_host_chunk)
        await nc.subscribe(subjects.CLIENT_REPLIES_ANY, cb=note_client_event)
    await nc.flush()
    url = httpx.URL(stack.base_url)
    through = SseClient(url.host, url.port or 80, DEV_API_KEY)
    direct = [SseClient("127.0.0.1", relay.port, "none") for relay in relays]
    times = {"direct": PathTimes(), "stack width 1": PathTimes()}
    pipeline = subjects.PIPELINE_SUBJECTS.removesuffix(">")

    async def once(path: str, index: int) -> tuple[TextTiming, tuple[float, float]]:
        before = [len(relay.exchanges) for relay in relays]
        passed.clear()
        if path == "direct":
            timing = await direct[index % len(direct)].timed_text(
                "/v1/chat/completions", engine._BODY
            )
        else:
            headers = {"x-llooma-race-width": "1"}
            timing = await through.timed_text("/v1/chat/completions", engine._BODY, headers)
        new = [e for relay, n in zip(relays, before, strict=True) for e in relay.exchanges[n:]]
        assert len(new) == 1, f"{len(new)} engine requests for one {path} request"
        return timing, new[0]

    for index in range(_WARM_UP):
        for path in times:
            with contextlib.suppress(Refused):
                await once(path, index)
    for index in range(requests):
        for path in list(times)[:: 1 if index % 2 else -1]:
            timing, (asked, answered) = await once(path, index)
            result = times[path]
            ttft = timing.first_token - timing.started
            result.ttft_ms.append(1000 * ttft)
            result.outside_ms.append(1000 * (ttft - (answered - asked)))
            result.to_engine_ms.append(1000 * (asked - timing.started))
            result.from_engine_ms.append(1000 * (timing.first_token - answered))
            if path != "direct":
                hops = first_passed(passed, pipeline)
                way_in = [h for h in hops if not h[0].startswith(_WAY_BACK)]
                for hop, at in [*way_in, ("request at the engine", asked)]:
                    if at <= asked:
                        result.hops_ms.setdefault(hop, []).append(1000 * (at - timing.started))
                back_hops = [h for h in hops if h[0].startswith(_WAY_BACK)]
                for hop, at in [*back_hops, ("client", timing.first_token)]:
                    if at >= answered:
                        result.back_ms.setdefault(hop, []).append(1000 * (at - answered))
    await through.close()
    for client in direct:
        await client.close()
    await nc.drain()
    return times


def first_passed(passed: list[tuple[str, float]], pipeline: str) -> list[tuple[str, float]]:
    """Each hop's first message of one request (later host chunks and deltas are the
    answer's rest, not its first token)."""
    seen: dict[str, float] = {}
    for subject, at in passed:
        if subject.startswith(pipeline):
            hop = subject.rsplit(".", 1)[1]
        elif subject.startswith(subjects.HOST_TASKS_ANY.removesuffix(">")):
            hop = "host task"
        else:
            hop = subject
        seen.setdefault(hop, at)
    return list(seen.items())


def report(times: dict[str, PathTimes]) -> str:
    lines = [
        "| path | requests | TTFT p50 ms | outside the engine p50 ms | p90 ms "
        "| to the engine p50 ms | from the engine p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path, t in times.items():
        p90 = sorted(t.outside_ms)[int(0.9 * len(t.outside_ms))]
        lines.append(
            f"| {path} | {len(t.ttft_ms)} | {statistics.median(t.ttft_ms):.1f} "
            f"| {statistics.median(t.outside_ms):.2f} | {p90:.2f} "
            f"| {statistics.median(t.to_engine_ms):.2f} "
            f"| {statistics.median(t.from_engine_ms):.2f} |"
        )
    added = statistics.median(times["stack width 1"].outside_ms) - statistics.median(
        times["direct"].outside_ms
    )
    lines.append(f"\nadded by the stack at width 1, p50: {added:.2f} ms\n")
    lines.append("| stack hop | passed p50 ms after the client sent |")
    lines.append("|---|---:|")
    for hop, values in _in_order(times["stack width 1"].hops_ms):
        lines.append(f"| {hop} | {statistics.median(values):.2f} |")
    lines.append("\n| first content, on the way back | passed p50 ms after the engine sent it |")
    lines.append("|---|---:|")
    for hop, values in _in_order(times["stack width 1"].back_ms):
        lines.append(f"| {hop} | {statistics.median(values):.2f} |")
    return "\n".join(lines)


def _in_order(hops: dict[str, list[float]]) -> list[tuple[str, list[float]]]:
    return sorted(hops.items(), key=lambda item: statistics.median(item[1]))


async def run(
    scratch: Path, servers: list[LlamaServer], requests: int, *, way_back: bool = False
) -> dict[str, PathTimes]:
    """Relays in front of `servers`, a stack of its own whose hosts reach the engines through
    them, and `requests` requests a path."""
    relays = [EngineRelay(server.port) for server in servers]
    for relay in relays:
        await relay.start()
    stack = Stack(
        root=scratch / "stack",
        http_port=free_port(),
        hosts=relayed_hosts(relays, servers),
    )
    await asyncio.to_thread(stack.start)
    try:
        return await measure(stack, relays, requests, way_back=way_back)
    finally:
        await asyncio.to_thread(stack.stop)
        for relay in relays:
            await relay.stop()


def write_results(times: dict[str, PathTimes], results_dir: Path, note: str) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    table = report(times)
    text = (
        "# Real engine: the stack's added time to first token, request by request\n\n"
        f"{note}\n\n{table}\n\n"
        "The engine suite's `added` (engine.md) is a difference of two medians, each dominated "
        "by the engine's own time to first token, so its noise hides a few ms. Here a TCP relay "
        "in the bench process sits in front of each llama-server (the engine suite's two, on a "
        "stack of this suite's own whose `openai` hosts reach them through the relays) and notes "
        "when each chat request reaches the engine and when the engine sends its first content. "
        "`outside the engine` = the client's TTFT minus that engine time, per request; direct "
        "requests (the lean SSE client to llama-server) go through the same relay, so both paths "
        "pay it. `added` = the stack's median minus direct's. Stack requests at "
        "`x-llooma-race-width: 1`, one at a time, paths alternating. The hop table: when a core "
        "NATS subscriber in the bench process saw each pipeline hop's message and the host task "
        "(that crossing included). Target (issue 14): added p50 <= 10 ms. "
        "`.venv/bin/python -m llooma.bench.engine_path --requests 40 [--way-back]` runs it alone; "
        "docs/ENGINE.md reads the figures.\n"
    )
    (results_dir / "engine_path.md").write_text(text)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument(
        "--way-back",
        action="store_true",
        help="also time the first host chunk and the racer's events after the engine answered",
    )
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="llooma-engine-path-") as scratch,
        engine.engines(Path(scratch) / "logs") as servers,
    ):
        times = uvloop.run(run(Path(scratch), servers, args.requests, way_back=args.way_back))
    print(report(times))


if __name__ == "__main__":
    main()
