"""The benchmarks' pure parts: arrivals, SLO maths, the throughput search, the plots, the
peers suite's per-process table."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
from pathlib import Path

import pytest

from llooma.bench import plots
from llooma.bench.peers import System, by_process_table
from llooma.bench.race import Cell, write_cdf_plot
from llooma.bench.scheduling import (
    SETTING_2,
    Interval,
    LeastLoaded,
    arrivals_for,
    piecewise_poisson,
    slo_attainment,
)
from llooma.bench.throughput import poisson_offsets, search_max_rate


def test_piecewise_poisson_follows_each_intervals_rate() -> None:
    schedule = (Interval(0, 2000, 4), Interval(2000, 6000, 20))
    arrivals = piecewise_poisson(schedule, random.Random(7))
    assert arrivals == sorted(arrivals)
    assert all(0 <= a < 6000 for a in arrivals)
    busy = [a for a in arrivals if a < 2000]
    quiet = [a for a in arrivals if a >= 2000]
    # Expected 500 and 200 arrivals; Poisson sd is about 22 and 14.
    assert 430 < len(busy) < 570
    assert 155 < len(quiet) < 245
    gaps = [b - a for a, b in itertools.pairwise(quiet)]
    assert statistics.fmean(gaps) == pytest.approx(20, rel=0.2)
    # Exponential gaps: the standard deviation is about the mean.
    assert statistics.stdev(gaps) == pytest.approx(20, rel=0.25)


def test_arrivals_are_seeded_and_cover_every_node() -> None:
    first, again, other = (
        arrivals_for(SETTING_2, 1),
        arrivals_for(SETTING_2, 1),
        arrivals_for(SETTING_2, 2),
    )
    assert first == again
    assert first != other
    assert first == sorted(first)
    origins = {a.origin for a in first}
    assert origins == {n.host for n in SETTING_2}
    # Node 1's peak (every 4 s for 300 s) dominates its first 300 s.
    early_node1 = sum(1 for a in first if a.origin == "sched-1" and a.at_s < 300)
    early_node2 = sum(1 for a in first if a.origin == "sched-2" and a.at_s < 300)
    assert early_node1 > 2 * early_node2


def test_slo_attainment_counts_failures_as_misses() -> None:
    latencies: list[float | None] = [10.0, 20.0, None, 30.0, 40.0]
    assert slo_attainment(latencies, 25.0) == pytest.approx(2 / 5)
    assert slo_attainment(latencies, 30.0) == pytest.approx(3 / 5)
    assert slo_attainment(latencies, 1000.0) == pytest.approx(4 / 5)
    assert slo_attainment(latencies, 5.0) == 0.0
    with pytest.raises(ValueError, match="no requests"):
        slo_attainment([], 1.0)


def test_least_loaded_prefers_the_emptiest_host_by_share_of_slots() -> None:
    queue = LeastLoaded(SETTING_2)
    queue.in_flight = {"sched-1": 9, "sched-2": 3, "sched-3": 6, "sched-4": 12}
    # 3/18 is the lowest share; sched-4 is full.
    assert queue.pick() == "sched-2"
    queue.in_flight = {n.host: n.capacity for n in SETTING_2}
    assert queue.pick() is None


def test_least_loaded_queue_is_fifo_and_waits_for_a_free_slot() -> None:
    async def scenario() -> list[int]:
        queue = LeastLoaded(SETTING_2)
        queue.in_flight = {n.host: n.capacity for n in SETTING_2}
        order: list[int] = []

        async def request(index: int) -> None:
            await queue.acquire()
            order.append(index)

        waiters = [asyncio.create_task(request(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert order == []
        for _ in range(3):
            await queue.release("sched-3")
            await asyncio.sleep(0.01)
        await asyncio.gather(*waiters)
        return order

    assert asyncio.run(scenario()) == [0, 1, 2]


def test_search_finds_the_largest_passing_rate_within_its_bounds() -> None:
    probed: list[float] = []

    def limit_at(capacity: float) -> float | None:
        probed.clear()

        async def passes(rate: float) -> bool:
            probed.append(rate)
            return rate <= capacity

        return asyncio.run(search_max_rate(passes, start=25, ceiling=1600, refine_steps=4))

    found = limit_at(300)
    assert found is not None
    # Doubling brackets 300 between 200 and 400; four halvings leave a 12.5-wide gap.
    assert 300 - 12.5 <= found <= 300
    assert probed[:5] == [25, 50, 100, 200, 400]
    assert len(probed) == 5 + 4
    found = limit_at(10)
    assert found is not None
    # Halving brackets 10 between 6.25 and 12.5, then four halvings of that gap.
    assert 10 - 6.25 / 16 <= found <= 10
    assert probed[:3] == [25, 12.5, 6.25]
    assert limit_at(2) is None
    assert probed == [25, 12.5, 6.25, 3.125]
    assert limit_at(10_000) == 1600


def test_poisson_offsets_match_the_rate() -> None:
    offsets = poisson_offsets(200.0, 10.0, random.Random(3))
    assert offsets == sorted(offsets)
    assert 1850 < len(offsets) < 2150
    assert all(0 <= o < 10.0 for o in offsets)


def test_plots_write_pngs(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n"
    written = [
        plots.overhead([1, 32, 128], [5.0, 40.0, 120.0], [8.0, 90.0, 300.0], tmp_path / "o.png"),
        plots.throughput(
            [25, 50, 100], [10.0, 30.0, 200.0], [True, True, False], 50, tmp_path / "t.png"
        ),
        plots.split(["a", "b"], [100.0, 200.0], [150.0, 260.0], tmp_path / "s.png"),
        plots.scheduling(
            [0.0, 100.0, 200.0],
            {"(a)": [0.0, 0.4, 0.7], "(c)": [0.0, 0.6, 1.0]},
            {"(a)": 170.0, "(c)": 130.0},
            172.0,
            tmp_path / "sched.png",
        ),
    ]
    rng = random.Random(1)
    cells = [
        Cell(
            distribution="lognormal-0.35",
            k=k,
            requests=50,
            measured_ms={},
            analytical_ms={},
            measured_fallback_rate=0.0,
            analytical_fallback_rate=0.0,
            worst_quantile_error=None,
            samples_ms=[700 * rng.lognormvariate(0, 0.35) for _ in range(50)],
        )
        for k in (1, 2)
    ]
    written.append(write_cdf_plot(cells, tmp_path / "cdf.png"))
    for path in written:
        data = path.read_bytes()
        assert data.startswith(png), path
        assert len(data) > 5000, path


async def test_the_bench_upstream_streams_what_an_openai_client_reads() -> None:
    """The peers bench's upstream speaks OpenAI's protocol as a real engine does: the official
    client reads its chunks, finish reason and usage, over one keep-alive connection."""
    import openai

    from llooma.bench.upstream import serve_forever
    from llooma.processes import free_port

    port = free_port()
    server = asyncio.create_task(serve_forever(port, 5))
    await asyncio.sleep(0.2)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
    try:
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "tok " * 5
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 5)
        whole = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
        assert whole.choices[0].message.content == "tok " * 5
        assert whole.usage is not None
        assert whole.usage.completion_tokens == 5
    finally:
        await client.close()
        server.cancel()


def test_processes_are_listed_busiest_first_with_each_systems_total() -> None:
    width_1 = System("LLooMA width 1", 0, "", cpu_ms_by_process={"racer": 1.5, "ingress": 2.0})
    width_2 = System("LLooMA width 2", 0, "", cpu_ms_by_process={"racer": 2.5, "ingress": 2.25})
    rows = by_process_table([width_1, width_2]).splitlines()
    assert rows[0] == "| process | LLooMA width 1 | LLooMA width 2 |"
    assert rows[2:] == [
        "| ingress | 2.00 | 2.25 |",
        "| racer | 1.50 | 2.50 |",
        "| total | 3.50 | 4.75 |",
    ]


def test_a_process_only_a_later_system_runs_gets_its_own_row() -> None:
    stack = System("LLooMA width 1", 0, "", cpu_ms_by_process={"racer": 1.5, "planner": 0.1})
    floor = System("floor", 0, "", cpu_ms_by_process={"racer": 0.5, "accounting": 0.25})
    rows = by_process_table([stack, floor]).splitlines()
    assert rows[2:] == [
        "| racer | 1.50 | 0.50 |",
        "| planner | 0.10 | 0.00 |",
        "| accounting | 0.00 | 0.25 |",
        "| total | 1.60 | 0.75 |",
    ]
