"""Split benchmark: time to last token for a four-part prompt, split vs. direct, on synthetic
hosts, and how often the planner chooses each for prompts with and without structure."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.progress import Progress

from llooma.bench import plots
from llooma.bench.sse_client import SseClient
from llooma.bench.stats import percentile
from llooma.host.config import Generation, HostConfig, Latency, ModelConfig
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack

MODEL = "synthetic-parts"
PART_TOKENS = 64
FOUR_PARTS = (
    "We are drafting the onboarding handbook for new engineers joining the platform team.\n"
    "1. Explain how the request path works from ingress to the hosts.\n"
    "2. Describe how host credentials are issued and revoked.\n"
    "3. Summarise how races pick a winner and cancel the loser.\n"
    "4. List the benchmarks a change to the racer must be checked against.\n"
)
UNSTRUCTURED = (
    "Tell me about the history of the lighthouse on the northern cape. It was built long ago. "
    "Many ships passed it in the storms of the last century, and the keepers kept logs."
)


def bench_hosts(nats_url: str) -> list[HostConfig]:
    return [
        HostConfig(
            name=f"parts-{index}",
            nats_url=nats_url,
            seed=500 + index,
            models=[
                ModelConfig(
                    name=MODEL,
                    capacity=256,
                    generation=Generation(max_tokens=4 * PART_TOKENS),
                    first_token=Latency(kind="lognormal", median_ms=150, sigma=0.3),
                    inter_token=Latency(kind="fixed", ms=15),
                )
            ],
        )
        for index in range(4)
    ]


@dataclass
class SplitResult:
    mode: str
    requests: int
    last_token_p50_ms: float
    last_token_p95_ms: float
    paths: dict[str, int]


async def _timed(http: SseClient, prompt: str, split: str) -> tuple[float, str]:
    body = json.dumps(
        {
            "model": MODEL,
            "stream": True,
            "max_tokens": 4 * PART_TOKENS,
            "messages": [{"role": "user", "content": prompt}],
        }
    ).encode()
    started = time.perf_counter()
    path = await http.path_of("/v1/chat/completions", body, {"x-llooma-split": split})
    return (time.perf_counter() - started) * 1000, path


async def measure(stack: Stack, requests: int, progress: Progress) -> list[SplitResult]:
    port = int(stack.base_url.rsplit(":", 1)[1])
    http = SseClient("127.0.0.1", port, DEV_API_KEY)
    task = progress.add_task("split vs direct", total=3 * requests)
    results = []
    for mode, prompt, split in (
        ("four parts, planner on", FOUR_PARTS, "auto"),
        ("four parts, split off (direct)", FOUR_PARTS, "off"),
        ("no structure, planner on", UNSTRUCTURED, "auto"),
    ):
        timings: list[float] = []
        paths: dict[str, int] = {}
        for _ in range(requests // 4):
            batch = await asyncio.gather(*(_timed(http, prompt, split) for _ in range(4)))
            for ms, path in batch:
                timings.append(ms)
                paths[path] = paths.get(path, 0) + 1
            progress.advance(task, 4)
        results.append(
            SplitResult(
                mode=mode,
                requests=len(timings),
                last_token_p50_ms=statistics.median(timings),
                last_token_p95_ms=percentile(timings, 0.95),
                paths=paths,
            )
        )
    await http.close()
    return results


def write_results(results: list[SplitResult], results_dir: Path, note: str) -> str:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "split.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    lines = [
        "| prompt | requests | last token p50 ms | last token p95 ms | paths taken |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        paths = ", ".join(f"{p}: {n}" for p, n in sorted(r.paths.items()))
        lines.append(
            f"| {r.mode} | {r.requests} | {r.last_token_p50_ms:.0f} "
            f"| {r.last_token_p95_ms:.0f} | {paths} |"
        )
    table = "\n".join(lines)
    plots.split(
        [r.mode for r in results],
        [r.last_token_p50_ms for r in results],
        [r.last_token_p95_ms for r in results],
        results_dir / "split.png",
    )
    (results_dir / "split.md").write_text(
        "# Split vs. direct: time to last token\n\n"
        f"{note}\n\n{table}\n\n![time to last token](split.png)\n\n"
        f"Four synthetic hosts (first token log-normal, median 150 ms, sigma 0.3; 15 ms per "
        f"token). The client's budget is {4 * PART_TOKENS} tokens: the direct answer streams all "
        f"of it from one host; split, each of the four parts gets a quarter ({PART_TOKENS}) and "
        "the parts race in parallel. `x-llooma-split: off` forces the direct path for the "
        "comparison; the last row shows the planner leaving an unstructured prompt alone.\n"
    )
    return table
