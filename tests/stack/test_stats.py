"""Table II metrics: the collector's arithmetic, and /v1/stats and /metrics on the running stack
against requests this test sends (real NATS, real hosts)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any, cast

import httpx
import pytest
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from llooma.membership import HostDirectory, ServiceDirectory
from llooma.metrics import StatsCollector
from llooma.settings import Settings
from llooma.v1.common_pb2 import REQUEST_PATH_DIRECT, REQUEST_PATH_FALLBACK, Usage
from llooma.v1.host_pb2 import HostAccepted, HostChunk, HostFinished, HostTask, HostToken
from llooma.v1.race_pb2 import (
    ATTEMPT_ROLE_CONTINUATION,
    ATTEMPT_ROLE_FALLBACK,
    ATTEMPT_ROLE_RACER,
    AttemptReport,
    IngressTally,
    RaceEvent,
    RejectionCount,
    RequestStart,
)
from llooma.v1.settlement_pb2 import (
    ATTEMPT_OUTCOME_FAILED,
    ATTEMPT_OUTCOME_LOST,
    ATTEMPT_OUTCOME_WON,
)
from services.ingress.api import Ingress
from services.ingress.stats import ROUTES
from tests.conftest import AUTH, RaceEvents
from tests.stack.test_race import wait_listed
from tests.stack.test_split import THREE_PARTS, answer_part
from tests.support.scripted_host import Reply, ScriptedHost


def _collector(**settings: Any) -> StatsCollector:
    config = Settings(**settings)
    hosts = HostDirectory(stale_after_s=config.host_stale_after_s, min_version="0.1.0")
    return StatsCollector(config, hosts)


def _race(
    request_id: str, winner: str, *, launched_after_ms: int, host_ms: int, fallback: bool = False
) -> RaceEvent:
    won = AttemptReport(
        host_id=winner,
        model="m",
        role=ATTEMPT_ROLE_FALLBACK if fallback else ATTEMPT_ROLE_RACER,
        outcome=ATTEMPT_OUTCOME_WON,
        launched_after_ms=launched_after_ms,
        first_token_ms=host_ms,
    )
    lost = AttemptReport(
        host_id="loser", model="m", role=ATTEMPT_ROLE_RACER, outcome=ATTEMPT_OUTCOME_LOST
    )
    return RaceEvent(
        request_id=request_id,
        task_id=uuid.uuid4().hex,
        path=REQUEST_PATH_FALLBACK if fallback else REQUEST_PATH_DIRECT,
        attempts=[lost, won],
        winner_host_id=winner,
        first_token_ms=launched_after_ms + host_ms,
        first_token_deadline_hit=fallback,
        succeeded=True,
    )


def test_percentiles_overhead_and_rates_follow_the_definitions() -> None:
    stats = _collector()
    for index in range(100):
        # Ingress time to first token 1..100 ms; the winning host took 0.5 of a ms less each.
        stats.request_started(f"r{index}", "direct", (index + 1) / 1000.0)
    for index in range(100):
        stats.record_race(
            _race(f"r{index}", "a" if index % 4 else "b", launched_after_ms=0, host_ms=index)
        )
    stats.request_started("late", "fallback", 1.5)
    stats.record_race(_race("late", "c", launched_after_ms=1000, host_ms=200, fallback=True))
    stats.request_failed()
    snap = stats.snapshot()
    direct = snap["first_token_ms"]["direct"]
    assert (direct["count"], direct["p50"], direct["p99"]) == (100, 50.5, 99.0)
    # Every direct request: 1 ms of control plane beyond its host; the fallback's wait for the
    # deadline is race policy, not overhead: 1500 - (1000 + 200).
    assert snap["overhead_ms"]["direct"]["p95"] == pytest.approx(1.0)
    assert snap["overhead_ms"]["fallback"]["p50"] == pytest.approx(300.0)
    assert snap["requests"] == {
        "total": 101,
        "by_path": {"direct": 100, "split": 0, "fallback": 1},
        "failed_before_first_token": 1,
    }
    assert snap["fallback"]["rate"] == pytest.approx(1 / 101)
    assert snap["fallback"]["fallback_wins"] == 1
    wins = {(w["host_id"], w["model"]): w["wins"] for w in snap["race_wins"]}
    assert wins == {("a", "m"): 75, ("b", "m"): 25, ("c", "m"): 1}
    assert snap["split_rate"] == 0.0
    assert snap["cost"]["cost_per_successful_response_micros"] is None


def test_a_replayed_race_counts_from_when_it_ran_not_when_it_was_read() -> None:
    stats = _collector()
    old = _race("old", "slow-host", launched_after_ms=0, host_ms=900)
    old.finished_unix_nanos = time.time_ns() - 15 * 60 * 1_000_000_000
    recent = _race("recent", "slow-host", launched_after_ms=0, host_ms=100)
    recent.finished_unix_nanos = time.time_ns() - 1_000_000_000
    stats.record_race(old)
    stats.record_race(recent)
    # The 15-minute-old race is outside the 5-minute window: only the recent one counts.
    assert stats.host_stats.p95_ms("slow-host") == pytest.approx(100.0)


def test_overhead_after_a_handover_is_measured_against_the_first_winner() -> None:
    stats = _collector()
    stats.request_started("handed-over", "direct", 0.130)
    first = AttemptReport(
        host_id="first",
        model="m",
        role=ATTEMPT_ROLE_RACER,
        outcome=ATTEMPT_OUTCOME_FAILED,
        launched_after_ms=0,
        first_token_ms=120,
        stalled=True,
    )
    continuation = AttemptReport(
        host_id="second",
        model="m",
        role=ATTEMPT_ROLE_CONTINUATION,
        outcome=ATTEMPT_OUTCOME_WON,
        launched_after_ms=2000,
        first_token_ms=80,
    )
    stats.record_race(
        RaceEvent(
            request_id="handed-over",
            task_id=uuid.uuid4().hex,
            path=REQUEST_PATH_DIRECT,
            attempts=[first, continuation],
            winner_host_id="second",
            first_token_ms=120,
            continuations=1,
            succeeded=True,
        )
    )
    # The client's first token came from "first" at 120 ms: 130 - 120 is the overhead.
    overhead = stats.snapshot()["overhead_ms"]["direct"]
    assert (overhead["count"], overhead["p50"]) == (1, pytest.approx(10.0))


def test_other_ingresses_tallies_count_once_whatever_comes_first() -> None:
    config = Settings()
    hosts = HostDirectory(stale_after_s=config.host_stale_after_s, min_version="0.1.0")
    stats = StatsCollector(config, hosts, "ingress-a")
    stats.request_started("mine", "direct", 0.050)
    stats.rejected(401, "invalid_api_key")
    # Another ingress's request whose race event comes before that ingress's tally.
    stats.record_race(_race("theirs", "b", launched_after_ms=0, host_ms=30))
    theirs = IngressTally(
        instance_id="ingress-b",
        started=[RequestStart(request_id="theirs", path="direct", first_token_ms=40.0)],
        failed_before_first_token=1,
        rejections=[RejectionCount(status=401, code="invalid_api_key", count=2)],
    )
    stats.record_tally(theirs)
    # This ingress's own tally, read back from the stream, was counted when it happened.
    mine = IngressTally(
        instance_id="ingress-a",
        started=[RequestStart(request_id="mine", path="direct", first_token_ms=50.0)],
    )
    stats.record_tally(mine)
    stats.record_race(_race("mine", "a", launched_after_ms=0, host_ms=45))
    snap = stats.snapshot()
    assert snap["requests"] == {
        "total": 2,
        "by_path": {"direct": 2, "split": 0, "fallback": 0},
        "failed_before_first_token": 1,
    }
    assert snap["rejections"] == {"total": 3, "by_status": {"401": {"invalid_api_key": 3}}}
    overhead = snap["overhead_ms"]["direct"]
    # 40 - 30 for theirs, 50 - 45 for mine.
    assert (overhead["count"], overhead["p50"]) == (2, 7.5)


def test_the_prometheus_text_carries_the_same_numbers() -> None:
    stats = _collector()
    stats.request_started("x", "split", 0.12)
    stats.record_race(_race("x", "a", launched_after_ms=0, host_ms=100))
    families = {f.name: f for f in text_string_to_metric_families(stats.prometheus_text().decode())}
    ttft = families["gen_ai_server_time_to_first_token_seconds"]
    count = next(s for s in ttft.samples if s.name.endswith("_count"))
    assert (count.labels["llooma_path"], count.value) == ("split", 1.0)
    wins = families["llooma_race_wins"].samples
    assert [(s.labels["llooma_host"], s.value) for s in wins] == [("a", 1.0)]
    assert families["llooma_split_rate"].samples[0].value == 1.0


async def test_stats_need_a_key_from_anywhere_but_loopback() -> None:
    settings = Settings()
    hosts = HostDirectory(stale_after_s=2.0, min_version="0.1.0")
    app = Starlette(routes=ROUTES)
    none = cast(Any, None)
    app.state.ingress = Ingress(
        settings, none, none, none, hosts, ServiceDirectory(stale_after_s=3.0)
    )
    app.state.stats = StatsCollector(settings, hosts)
    remote = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
    local = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=remote, base_url="http://x") as client:
        assert (await client.get("/v1/stats")).status_code == 401
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/v1/stats", headers=AUTH)).status_code == 200
        page = await client.get("/")
        assert page.status_code == 200
        assert "/v1/stats" in page.text
    async with httpx.AsyncClient(transport=local, base_url="http://x") as client:
        assert (await client.get("/v1/stats")).status_code == 200


# -- on the running stack ------------------------------------------------------------------


async def _quick(task: HostTask, reply: Reply, delay_s: float) -> None:
    await asyncio.sleep(delay_s)
    await reply(HostChunk(token=HostToken(text="fine")))
    usage = Usage(input_tokens=3, output_tokens=1)
    await reply(HostChunk(finished=HostFinished(finish_reason="stop", usage=usage)))


async def _mute(_: HostTask, reply: Reply) -> None:
    await reply(HostChunk(accepted=HostAccepted()))


async def send_traffic(
    http: httpx.AsyncClient, nc: Client, tag: str
) -> tuple[Counter[str], set[str], list[str]]:
    """Direct, fallback and split requests to scripted hosts of this test's own models;
    returns the paths the client was told, the request ids and the host ids."""
    direct_model, fallback_model, split_model = (f"{kind}-{tag}" for kind in ("d", "f", "s"))

    async def fast(task: HostTask, reply: Reply) -> None:
        await _quick(task, reply, 0.0)

    async def slow(task: HostTask, reply: Reply) -> None:
        await _quick(task, reply, 0.06)

    async def splitter(task: HostTask, reply: Reply) -> None:
        await answer_part({}, [], task, reply)

    hosts = [
        ScriptedHost(nc, f"fast-{tag}", direct_model, fast, stake=3.0),
        ScriptedHost(nc, f"slow-{tag}", direct_model, slow, stake=5.0),
        ScriptedHost(nc, f"mute-{tag}", fallback_model, _mute, stake=100.0),
        ScriptedHost(nc, f"rescuer-{tag}", fallback_model, fast, stake=0.0),
        *(ScriptedHost(nc, f"part{i}-{tag}", split_model, splitter) for i in range(3)),
    ]
    for host in hosts:
        await host.__aenter__()
    paths: Counter[str] = Counter()
    request_ids: set[str] = set()

    async def send(model: str, content: str, headers: dict[str, str]) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        response = await http.post("/v1/chat/completions", json=body, headers={**AUTH, **headers})
        assert response.status_code == 200, response.text
        paths[response.headers["x-llooma-path"]] += 1
        request_ids.add(response.headers["x-llooma-request-id"])

    try:
        await wait_listed(http, direct_model, hosts=2)
        await wait_listed(http, fallback_model, hosts=2)
        await wait_listed(http, split_model, hosts=3)
        for _ in range(6):
            await send(direct_model, "hello", {"x-llooma-split": "off"})
        for _ in range(2):
            await send(
                fallback_model,
                "hello",
                {"x-llooma-race-width": "1", "x-llooma-first-token-deadline-ms": "150"},
            )
        await send(split_model, THREE_PARTS, {"x-llooma-race-width": "1"})
    finally:
        for host in hosts:
            await host.__aexit__(None, None, None)
    return paths, request_ids, [h.host_id for h in hosts]


async def settled_events(
    race_events: RaceEvents, request_ids: set[str], stats_url: httpx.AsyncClient, before: int
) -> tuple[list[RaceEvent], dict[str, Any]]:
    """This test's race events, once /v1/stats has counted as many new races as were seen."""
    events: list[RaceEvent] = []
    stats: dict[str, Any] = {}
    for _ in range(150):
        await asyncio.sleep(0.1)
        events = [e for e in race_events.all if e.request_id in request_ids]
        stats = (await stats_url.get("/v1/stats")).json()
        if len(events) >= len(request_ids) + 2 and stats["tasks"]["total"] - before == len(events):
            return events, stats
    raise AssertionError(f"stats never settled: {len(events)} events, {stats.get('tasks')}")


async def test_v1_stats_and_metrics_match_the_requests_sent(
    http: httpx.AsyncClient, nc: Client, race_events: RaceEvents
) -> None:
    before = (await http.get("/v1/stats")).json()
    ttft_before = await ttft_counts(http)
    tag = uuid.uuid4().hex[:6]
    paths, request_ids, host_ids = await send_traffic(http, nc, tag)
    assert paths["fallback"] >= 1, paths
    assert paths["split"] == 1, paths
    assert paths["direct"] >= 6, paths
    events, after = await settled_events(race_events, request_ids, http, before["tasks"]["total"])

    by_path = {p: after["requests"]["by_path"][p] - before["requests"]["by_path"][p] for p in paths}
    assert by_path == dict(paths)
    for path, sent in paths.items():
        counted = after["first_token_ms"][path]["count"] - before["first_token_ms"][path]["count"]
        assert counted == sent
        assert after["first_token_ms"][path]["p50"] > 0
    # Direct and fallback requests have one race each: each got an overhead sample.
    assert (
        after["overhead_ms"]["direct"]["count"] - before["overhead_ms"]["direct"]["count"]
        == (paths["direct"])
    )
    assert after["overhead_ms"]["direct"]["p50"] >= 0

    succeeded = [e for e in events if e.succeeded]
    assert after["tasks"]["succeeded"] - before["tasks"]["succeeded"] == len(succeeded)
    with_fallback = [e for e in events if any(a.role == ATTEMPT_ROLE_FALLBACK for a in e.attempts)]
    assert len(with_fallback) >= paths["fallback"]
    assert after["fallback"]["tasks_with_fallback"] - before["fallback"][
        "tasks_with_fallback"
    ] == len(with_fallback)
    wins = Counter(e.winner_host_id for e in succeeded)
    reported = {w["host_id"]: w["wins"] for w in after["race_wins"] if w["host_id"] in host_ids}
    assert reported == dict(wins)
    assert sum(w["wins"] for w in after["race_wins"]) == after["tasks"]["succeeded"]
    assert after["split_rate"] == pytest.approx(
        after["requests"]["by_path"]["split"] / after["requests"]["total"]
    )

    metrics = await http.get("/metrics")
    assert metrics.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    prometheus_wins = {
        s.labels["llooma_host"]: s.value
        for s in families["llooma_race_wins"].samples
        if s.name.endswith("_total")
    }
    for host, count in wins.items():
        assert prometheus_wins[host] == count
    # /metrics is this ingress's own, /v1/stats every ingress's: this test's requests in both.
    ttft_after = await ttft_counts(http)
    for path, sent in paths.items():
        assert ttft_after.get(path, 0) - ttft_before.get(path, 0) == sent


async def ttft_counts(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    family = families.get("gen_ai_server_time_to_first_token_seconds")
    samples = family.samples if family is not None else []
    return {s.labels["llooma_path"]: s.value for s in samples if s.name.endswith("_count")}


async def test_live_hosts_carry_their_score_terms_and_stake(
    http: httpx.AsyncClient, nc: Client
) -> None:
    model = f"terms-{uuid.uuid4().hex[:6]}"

    async def script(task: HostTask, reply: Reply) -> None:
        await _quick(task, reply, 0.0)

    async with ScriptedHost(nc, f"staked-{model}", model, script, stake=7.5):
        await wait_listed(http, model)
        stats = (await http.get("/v1/stats")).json()
    host = next(h for h in stats["hosts"] if h["host_id"] == f"staked-{model}")
    assert host["state"] == "eligible"
    assert host["models"] == [{"name": model, "stake": 7.5, "capacity": 64, "in_flight": 0}]
    # A host never raced sits mid-range on latency and has no errors.
    assert host["terms"]["latency_p95"] == 0.5
    assert host["terms"]["error_rate"] == 0.0
    weights = stats["score_weights"]
    expected = sum(weights[name] * min(1.0, value) for name, value in host["terms"].items())
    assert host["score"] == pytest.approx(expected, abs=1e-3)


async def test_a_new_collector_replays_recent_races(
    http: httpx.AsyncClient, nc: Client, race_events: RaceEvents
) -> None:
    # Direct races only: replay is the same for every path, and the fewer moving parts the
    # better for a test of it.
    model = f"replay-{uuid.uuid4().hex[:6]}"

    async def answer(task: HostTask, reply: Reply) -> None:
        await _quick(task, reply, 0.0)

    scripted = [ScriptedHost(nc, f"{name}-{model}", model, answer) for name in ("a", "b")]
    host_ids = [host.host_id for host in scripted]
    request_ids: set[str] = set()
    for host in scripted:
        await host.__aenter__()
    try:
        await wait_listed(http, model, hosts=2)
        for _ in range(6):
            body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
            response = await http.post("/v1/chat/completions", json=body, headers=AUTH)
            assert response.status_code == 200, response.text
            request_ids.add(response.headers["x-llooma-request-id"])
    finally:
        for host in scripted:
            await host.__aexit__(None, None, None)
    events: list[RaceEvent] = []
    for _ in range(150):
        events = [e for e in race_events.all if e.request_id in request_ids]
        if len(events) == len(request_ids):
            break
        await asyncio.sleep(0.1)
    assert len(events) == len(request_ids)
    settings = Settings(stats_replay_s=600)
    hosts = HostDirectory(stale_after_s=2.0, min_version="0.1.0")
    replayed = StatsCollector(settings, hosts)
    await replayed.start(nc.jetstream())
    try:
        wins = Counter(e.winner_host_id for e in events if e.succeeded)
        for _ in range(100):
            got = {
                w["host_id"]: w["wins"]
                for w in replayed.snapshot()["race_wins"]
                if w["host_id"] in host_ids
            }
            if got == dict(wins):
                break
            await asyncio.sleep(0.05)
        assert got == dict(wins)
    finally:
        await replayed.stop()
