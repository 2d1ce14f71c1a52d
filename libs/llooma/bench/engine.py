"""Real-engine benchmark: time to first token and decode rate, direct to llama-server vs. through
the stack at race width 1 and 2, paired in one run.

Two llama-servers (the same build and model as the engine tests, `llooma.engine`) each back one
`openai` host. Each round sends one request down every path, in an order that rotates round by
round, so machine noise lands on all paths alike; "direct" alternates between the two engines.
Output tokens are counted by the engine's own /tokenize on the text the client received, after
the clocks stop, the same way for every path.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
from rich.progress import Progress

from llooma.bench.sse_client import SseClient, TextTiming
from llooma.bench.stats import percentile
from llooma.engine import UPSTREAM_MODEL, LlamaServer, ensure_engine
from llooma.host.config import Generation, HostConfig, ModelConfig
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack

MODEL = "gemma-3-270m-bench"
OUTPUT_TOKENS = 24
PATHS = ("direct", "stack width 1", "stack width 2")
_WIDTH = {"stack width 1": "1", "stack width 2": "2"}
_BODY = orjson.dumps(
    {
        "model": MODEL,
        "stream": True,
        "max_tokens": OUTPUT_TOKENS,
        "messages": [{"role": "user", "content": "Write a paragraph about rivers and the sea."}],
    }
)
_WARM_UP = 5


@contextmanager
def engines(log_dir: Path, say: Callable[[str], None] = print) -> Iterator[list[LlamaServer]]:
    """Two llama-servers (built first if this machine has none), stopped on exit."""
    paths = ensure_engine(say)
    servers = [LlamaServer(paths, log_dir / f"llama-server-{key}.log") for key in "ab"]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def bench_hosts(nats_url: str, servers: list[LlamaServer]) -> list[HostConfig]:
    return [
        HostConfig(
            name=f"bench-engine-{key}",
            nats_url=nats_url,
            models=[
                ModelConfig(
                    name=MODEL,
                    backend="openai",
                    base_url=server.openai_url,
                    upstream_model=UPSTREAM_MODEL,
                    metrics_url=server.metrics_url,
                    capacity=4,
                    generation=Generation(max_tokens=1024),
                )
            ],
        )
        for key, server in zip("ab", servers, strict=True)
    ]


@dataclass
class PathResult:
    path: str
    ttft_ms: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)


async def _tokens(engine: httpx.AsyncClient, text: str) -> int:
    response = await engine.post("/tokenize", json={"content": text})
    response.raise_for_status()
    return len(response.json()["tokens"])


async def measure(
    stack: Stack, servers: list[LlamaServer], requests: int, progress: Progress
) -> list[PathResult]:
    stack_url = httpx.URL(stack.base_url)
    through = SseClient(stack_url.host, stack_url.port or 80, DEV_API_KEY)
    direct = [SseClient("127.0.0.1", server.port, "none") for server in servers]

    async def once(path: str, round_index: int) -> TextTiming:
        if path == "direct":
            engine = direct[round_index % len(direct)]
            return await engine.timed_text("/v1/chat/completions", _BODY)
        headers = {"x-llooma-race-width": _WIDTH[path]}
        return await through.timed_text("/v1/chat/completions", _BODY, headers)

    for index in range(_WARM_UP):
        for path in PATHS:
            await once(path, index)
    samples: dict[str, list[TextTiming]] = {path: [] for path in PATHS}
    task = progress.add_task("engine: direct / width 1 / width 2", total=requests * len(PATHS))
    for index in range(requests):
        # Rotate the order, so no path always follows another (a loser still finishing, say).
        order = PATHS[index % len(PATHS) :] + PATHS[: index % len(PATHS)]
        for path in order:
            samples[path].append(await once(path, index))
            progress.advance(task)
    await through.close()
    for client in direct:
        await client.close()
    results = []
    async with httpx.AsyncClient(base_url=servers[0].base_url, timeout=30.0) as engine:
        for path in PATHS:
            result = PathResult(path)
            for timing in samples[path]:
                tokens = await _tokens(engine, timing.text)
                result.ttft_ms.append((timing.first_token - timing.started) * 1000)
                result.output_tokens.append(tokens)
                decode_s = timing.last_token - timing.first_token
                if tokens > 1 and decode_s > 0:
                    result.tokens_per_s.append((tokens - 1) / decode_s)
            results.append(result)
    return results


def summary(result: PathResult, direct: PathResult) -> dict[str, float | int | str]:
    ttft50, ttft99 = statistics.median(result.ttft_ms), percentile(result.ttft_ms, 0.99)
    base50, base99 = statistics.median(direct.ttft_ms), percentile(direct.ttft_ms, 0.99)
    return {
        "path": result.path,
        "requests": len(result.ttft_ms),
        "ttft_p50_ms": ttft50,
        "ttft_p99_ms": ttft99,
        "added_ttft_p50_ms": ttft50 - base50,
        "added_ttft_p99_ms": ttft99 - base99,
        "tokens_per_s_p50": statistics.median(result.tokens_per_s),
        # The slow tail of a rate is its low end: the rate 99% of requests beat.
        "tokens_per_s_p1": percentile(result.tokens_per_s, 0.01),
        "output_tokens_p50": statistics.median(result.output_tokens),
    }


def report(results: list[PathResult]) -> str:
    direct = results[0]
    lines = [
        "| path | requests | TTFT p50 ms | TTFT p99 ms | added p50 ms | added p99 ms "
        "| tokens/s p50 | tokens/s p1 | output tokens p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        s = summary(result, direct)
        lines.append(
            f"| {s['path']} | {s['requests']} | {s['ttft_p50_ms']:.1f} | {s['ttft_p99_ms']:.1f} "
            f"| {s['added_ttft_p50_ms']:.1f} | {s['added_ttft_p99_ms']:.1f} "
            f"| {s['tokens_per_s_p50']:.1f} | {s['tokens_per_s_p1']:.1f} "
            f"| {s['output_tokens_p50']:.0f} |"
        )
    return "\n".join(lines)


def write_results(results: list[PathResult], results_dir: Path, note: str) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    table = report(results)
    summaries = [summary(result, results[0]) for result in results]
    (results_dir / "engine.json").write_text(json.dumps(summaries, indent=2))
    text = (
        "# Real engine: llama-server direct vs. through the stack\n\n"
        f"{note}\n\n{table}\n\n"
        "Engine: llama.cpp's llama-server from the llama-cpp-python 0.3.36 sdist "
        "(`llooma engine build`), Gemma 3 270M Q4_K_M, two servers (`-t 1 -c 4096 -np 2`, "
        "`--no-jinja --chat-template gemma`), each behind one `openai` host. Every round sends one "
        f"streamed request ({OUTPUT_TOKENS} output tokens at most, default sampling) down each "
        "path, in an order that rotates by round; one request at a time. Direct: the lean SSE "
        "client straight to llama-server's /v1/chat/completions (alternating between the two "
        "servers). Stack: the same body through ingress, privacy, planner, dispatcher, racer "
        "and a host, with `x-llooma-race-width: 1` or `2` (width 2 races both engines, which "
        "share the machine's two cores with each other and the stack). TTFT: to the first "
        "non-empty content delta; `added` is the path minus direct at the same percentile. "
        "tokens/s: output tokens after the first over the time from the first to the last "
        "content delta, tokens counted by the engine's /tokenize on the text received; p1 is "
        "the slow tail (99% of requests decode faster).\n"
    )
    (results_dir / "engine.md").write_text(text)
    return table
