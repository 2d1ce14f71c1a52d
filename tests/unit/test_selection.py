"""The host-selection pipeline, pure: each filter, each scorer, the picker, capacity by
engine, and the callers (dispatcher, admission, planner, metrics) seeing one answer."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, cast

import pytest

from llooma import heartbeats, selection
from llooma.bus import MEMBERSHIP_TTL_S
from llooma.host_stats import HostStats
from llooma.membership import HostDirectory
from llooma.metrics import StatsCollector
from llooma.planning import ModelRates, PlannerConfig, decompose, estimate_ms
from llooma.selection import Ask, Endpoint, Host, Policy, Selector
from llooma.settings import ORCHESTRATED_MODEL, VERSION, Settings
from llooma.v1.host_pb2 import HostHeartbeat, ModelCapability, ModelFeatures
from services.dispatcher.handlers import Dispatcher
from services.ingress.limits import Limits
from services.planner.handlers import Planner

POLICY = Policy(
    stale_after_s=2.0,
    min_version=(0, 1, 0),
    suspended=frozenset({"banned"}),
    excluded=frozenset({"echo"}),
)


@dataclass
class Entry:
    key: str
    heartbeat: HostHeartbeat
    age_s: float = 0.0

    def staleness_s(self, now: float) -> float:
        return self.age_s


def beat(*models: ModelCapability, load: float = 0.0, draining: bool = False) -> HostHeartbeat:
    return HostHeartbeat(version=VERSION, models=models, load=load, draining=draining)


def cap(name: str = "m", **fields: Any) -> ModelCapability:
    return ModelCapability(name=name, **fields)


def host(host_id: str = "h", heartbeat: HostHeartbeat | None = None, age: float = 0.0) -> Host:
    return Host(host_id, heartbeat or beat(cap()), age)


def endpoint(capability: ModelCapability, host_id: str = "h") -> Endpoint:
    return Endpoint(host(host_id, beat(capability)), capability)


# -- filters ---------------------------------------------------------------------------------


def test_host_filters_each_turn_away_one_kind_of_host() -> None:
    ask = Ask("m")
    assert selection.not_suspended(host("ok"), ask, POLICY)
    assert not selection.not_suspended(host("banned"), ask, POLICY)
    assert selection.not_draining(host(), ask, POLICY)
    assert not selection.not_draining(host(heartbeat=beat(draining=True)), ask, POLICY)
    old = HostHeartbeat(version="0.0.9")
    assert not selection.min_version(host(heartbeat=old), ask, POLICY)
    assert selection.min_version(host(heartbeat=HostHeartbeat(version="0.1.0")), ask, POLICY)
    assert selection.fresh(host(age=2.0), ask, POLICY)
    assert not selection.fresh(host(age=2.01), ask, POLICY)


def test_a_host_is_fresh_for_the_wait_it_announced_plus_the_grace() -> None:
    ask, grace = Ask("m"), selection.NEXT_BEAT_GRACE_S

    def resting(announced_ms: int, age: float) -> Host:
        return host(heartbeat=HostHeartbeat(version=VERSION, next_beat_ms=announced_ms), age=age)

    # At rest, announcing 5 s: kept well past the operator's 2 s, dropped once the beat is late.
    assert selection.fresh(resting(5000, 4.0), ask, POLICY)
    assert selection.fresh(resting(5000, 5.0 + grace), ask, POLICY)
    assert not selection.fresh(resting(5000, 5.0 + grace + 0.01), ask, POLICY)
    # Serving, announcing 0.5 s (or an older host announcing nothing): the operator's 2 s.
    for announced_ms in (500, 0):
        assert selection.fresh(resting(announced_ms, 2.0), ask, POLICY)
        assert not selection.fresh(resting(announced_ms, 2.01), ask, POLICY)
    # The staleness term is the share of that allowance, so a resting host is not ranked
    # below a busy one for beating less often.
    context = selection.Context(selection.NothingObserved(), POLICY)
    late = Endpoint(resting(5000, 3.25), cap())
    assert selection.staleness(late, ask, context) == pytest.approx(3.25 / (5.0 + grace))


def test_model_filters_serve_exclude_reach_and_capability() -> None:
    direct, pool = Ask("m"), Ask(ORCHESTRATED_MODEL)
    assert selection.serves_model(endpoint(cap("m")), direct, POLICY)
    assert not selection.serves_model(endpoint(cap("n")), direct, POLICY)
    assert selection.serves_model(endpoint(cap("n")), pool, POLICY)
    # The demo-model exclusion keeps echo out of the orchestrated pool only.
    assert not selection.not_excluded(endpoint(cap("echo")), pool, POLICY)
    assert selection.not_excluded(endpoint(cap("echo")), Ask("echo"), POLICY)
    assert selection.engine_reachable(endpoint(cap()), direct, POLICY)
    assert not selection.engine_reachable(endpoint(cap(engine_unreachable=True)), direct, POLICY)
    tools = cap(features=ModelFeatures(tools=True, logprobs=True))
    assert selection.capable(endpoint(tools), Ask("m", frozenset({"tools", "logprobs"})), POLICY)
    assert not selection.capable(endpoint(tools), Ask("m", frozenset({"json_schema"})), POLICY)
    assert not selection.capable(endpoint(tools), Ask("m", frozenset({"telepathy"})), POLICY)
    assert selection.capable(endpoint(cap()), Ask("m"), POLICY)


def test_a_rejected_host_names_the_first_rule_it_broke() -> None:
    selector = Selector(POLICY, selection.DEFAULT_WEIGHTS)
    now = time.monotonic()
    assert selector.rejection(Entry("banned", beat(draining=True)), now) == "not_suspended"
    assert selector.rejection(Entry("h", beat(draining=True)), now) == "not_draining"
    assert selector.rejection(Entry("h", beat(), age_s=9.0), now) == "fresh"
    assert selector.rejection(Entry("h", beat()), now) is None


def test_the_pipeline_keeps_only_endpoints_that_pass_every_filter() -> None:
    entries = [
        Entry("good", beat(cap("m"), cap("echo"))),
        Entry("banned", beat(cap("m"))),
        Entry("stale", beat(cap("m")), age_s=5.0),
        Entry("down", beat(cap("m", engine_unreachable=True))),
        Entry("other", beat(cap("n"))),
    ]
    selector = Selector(POLICY, selection.DEFAULT_WEIGHTS)
    found = {(e.host_id, e.model.name) for e in selector.endpoints(entries, Ask("m"))}
    assert found == {("good", "m")}
    pool = {(e.host_id, e.model.name) for e in selector.endpoints(entries, Ask("llooma"))}
    assert pool == {("good", "m"), ("other", "n")}
    assert {e.host_id for e in selector.endpoints(entries, Ask("echo"))} == {"good"}


# -- scorers ---------------------------------------------------------------------------------


class Observed:
    def __init__(self, p95: float | None = None, errors: float = 0.0, quality: float = 0.5):
        self._p95, self._errors, self._quality = p95, errors, quality

    def p95_ms(self, host_id: str, now: float | None = None) -> float | None:
        return self._p95

    def error_rate(self, host_id: str) -> float:
        return self._errors

    def quality(self, host_id: str) -> float:
        return self._quality


def test_each_scorer_is_one_term_of_s_h() -> None:
    context = selection.Context(Observed(p95=250.0, errors=0.2, quality=0.9), POLICY)
    busy = Endpoint(host("h", beat(cap(), load=0.7), age=0.5), cap())
    ask = Ask("m", deadline_ms=1000)
    assert selection.load(busy, ask, context) == pytest.approx(0.7)
    assert selection.latency_p95(busy, ask, context) == pytest.approx(0.25)
    assert selection.staleness(busy, ask, context) == pytest.approx(0.25)
    assert selection.error_rate(busy, ask, context) == pytest.approx(0.2)
    assert selection.quality_deficit(busy, ask, context) == pytest.approx(0.1)
    unknown = selection.Context(selection.NothingObserved(), POLICY)
    assert selection.latency_p95(busy, ask, unknown) == selection.UNKNOWN_LATENCY_TERM
    assert selection.quality_deficit(busy, ask, unknown) == pytest.approx(0.5)
    assert list(selection.score_terms(busy, ask, context)) == list(selection.SCORERS)


def test_s_h_is_the_weighted_sum_of_clamped_terms() -> None:
    weights = {"load": 0.4, "latency_p95": 0.3, "staleness": 0.2, "error_rate": 0.1}
    assert selection.weighted({"load": 1.0}, weights) == pytest.approx(0.4)
    assert selection.weighted(dict.fromkeys(weights, 7.0), weights) == pytest.approx(1.0)
    assert selection.weighted({"load": -3.0, "unweighted": 1.0}, weights) == 0.0


def test_weights_come_from_settings_by_scorer_name() -> None:
    settings = Settings(score_weights=(0.1, 0.2, 0.3, 0.4), duel_quality_weight=0.5)
    weights = selection.weights_from_settings(settings)
    assert weights == {
        "load": 0.1,
        "latency_p95": 0.2,
        "staleness": 0.3,
        "error_rate": 0.4,
        "quality_deficit": 0.5,
    }
    assert set(weights) == set(selection.SCORERS)


def test_a_new_term_is_one_scorer_and_its_weight() -> None:
    def engine_queue(endpoint: Endpoint, ask: Ask, context: selection.Context) -> float:
        return endpoint.model.engine_waiting / 10

    scorers = {**selection.SCORERS, "engine_queue": engine_queue}
    selector = Selector(POLICY, {"engine_queue": 1.0}, scorers=scorers)
    entries = [
        Entry("queued", beat(cap(engine_waiting=8))),
        Entry("idle", beat(cap(engine_waiting=0))),
    ]
    scores = {c.host_id: c.score for c in selector.candidates(entries, Ask("m"))}
    assert scores == {"queued": pytest.approx(0.8), "idle": 0.0}


def test_candidates_carry_the_score_and_the_models_stake() -> None:
    selector = Selector(POLICY, {"load": 1.0})
    entries = [Entry("a", beat(cap("m", stake=3.0), load=0.25))]
    (candidate,) = selector.candidates(entries, Ask("m"))
    assert candidate == selection.Candidate("a", "m", 0.25, 3.0)


# -- picker ----------------------------------------------------------------------------------


def test_the_picker_draws_distinct_hosts_from_the_best_bucket() -> None:
    candidates = [selection.Candidate(f"h{i}", "m", i / 10, 1.0) for i in range(6)]
    rng = random.Random(5)
    for _ in range(100):
        chosen = Selector.pick(candidates, k=2, bucket_size=3, rng=rng)
        assert len({c.host_id for c in chosen}) == 2
        assert {c.host_id for c in chosen} <= {"h0", "h1", "h2"}


# -- capacity by engine ----------------------------------------------------------------------


def test_models_and_hosts_on_one_engine_count_as_one_capacity() -> None:
    shared = [
        endpoint(cap("m", capacity=4, engine_id="gpu0"), "a"),
        endpoint(cap("n", capacity=4, engine_id="gpu0"), "a"),
        endpoint(cap("m", capacity=6, engine_id="gpu0"), "b"),
    ]
    assert selection.capacity(shared, per_host_max=100) == 6
    assert selection.independent_engines(shared) == 1
    alone = [endpoint(cap("m", capacity=4), "a"), endpoint(cap("n", capacity=4), "a")]
    assert selection.capacity(alone, per_host_max=100) == 8
    assert selection.capacity(alone, per_host_max=5) == 5
    # A model that names no engine is taken at its word: each slot runs apart.
    assert selection.independent_engines(alone) == 8


# -- the callers -----------------------------------------------------------------------------


def directory(*entries: tuple[str, HostHeartbeat]) -> HostDirectory:
    hosts = HostDirectory(stale_after_s=2.0, min_version="0.1.0")
    for key, heartbeat in entries:
        hosts.members._apply(key, heartbeat.SerializeToString(), "PUT", time.time())
    return hosts


def test_the_hosts_view_keeps_a_resting_host_for_what_it_announced_and_drops_a_silent_one() -> None:
    hosts = HostDirectory(stale_after_s=2.0, min_version="0.1.0")

    def heard(key: str, next_beat_ms: int, age_s: float) -> None:
        heartbeat = HostHeartbeat(version=VERSION, models=[cap("m")], next_beat_ms=next_beat_ms)
        hosts.members._apply(key, heartbeat.SerializeToString(), "PUT", time.time() - age_s)

    grace = selection.NEXT_BEAT_GRACE_S
    # Announced 5 s at rest: not dropped at 6 s, though the operator's cutoff is 2 s.
    heard("resting", 5000, age_s=5.0 + grace - 0.5)
    # Announced 5 s, then stopped beating: dropped once that wait and the grace are over.
    heard("resting-dead", 5000, age_s=5.0 + grace + 0.5)
    # Announced 0.5 s while serving: dropped after the 2 s cutoff, as before.
    heard("busy", 500, age_s=1.5)
    heard("busy-dead", 500, age_s=2.5)
    # At most `heartbeats.MAX_NEXT_BEAT_MS` is accepted: the bucket keeps such a host too.
    assert heartbeats.MAX_NEXT_BEAT_MS / 1000 + grace < MEMBERSHIP_TTL_S
    assert {m.key for m in hosts.eligible("m")} == {"resting", "busy"}
    assert {m.key for m in hosts.serving()} == {"resting", "busy"}


def test_admission_counts_no_suspended_or_unreachable_host_and_one_shared_engine() -> None:
    settings = Settings(suspended_hosts=["banned"])
    hosts = directory(
        ("ok", beat(cap("m", capacity=2))),
        ("banned", beat(cap("m", capacity=50))),
        ("down", beat(cap("m", capacity=50, engine_unreachable=True))),
        ("s1", beat(cap("m", capacity=3, engine_id="e"), cap("n", capacity=3, engine_id="e"))),
        ("s2", beat(cap("m", capacity=3, engine_id="e"))),
    )
    limits = Limits(settings, hosts)
    assert limits.model_capacity("m") == 2 + 3
    assert limits.model_capacity(ORCHESTRATED_MODEL) == 2 + 3


def test_the_dispatcher_races_only_what_the_pipeline_lets_through() -> None:
    settings = Settings(suspended_hosts=["banned"])
    hosts = directory(
        ("ok", beat(cap("m"))),
        ("banned", beat(cap("m"))),
        ("down", beat(cap("m", engine_unreachable=True))),
        ("demo", beat(cap("echo"))),
    )
    none = cast(Any, None)
    dispatcher = Dispatcher(settings, hosts, none, none, "dispatcher-test")
    assert {c.host_id for c in dispatcher.candidates("m", 1000)} == {"ok"}
    assert {c.host_id for c in dispatcher.candidates(ORCHESTRATED_MODEL, 1000)} == {"ok"}


def test_the_planner_counts_one_shared_engine_as_one() -> None:
    settings = Settings()
    shared = directory(
        ("a", beat(cap("m", engine_id="box"))),
        ("b", beat(cap("m", engine_id="box"))),
        ("c", beat(cap("m", engine_id="box"))),
    )
    apart = directory(
        ("a", beat(cap("m", engine_id="x"))),
        ("b", beat(cap("m", engine_id="y"))),
        ("c", beat(cap("m", engine_id="z"))),
    )
    none = cast(Any, None)
    assert Planner(settings, none, none, "p", shared).engines("m") == 1
    assert Planner(settings, none, none, "p", apart).engines("m") == 3
    plan = decompose("Answer these:\n1. one thing\n2. another thing\n3. a third thing")
    assert plan is not None
    assert len(plan.nodes) == 3
    rates, config = ModelRates(), PlannerConfig()
    direct, parallel = estimate_ms(plan, rates, 0, config, 0.0, engines=3)
    _, serial = estimate_ms(plan, rates, 0, config, 0.0, engines=1)
    assert estimate_ms(plan, rates, 0, config, 0.0) == (direct, parallel)
    assert parallel < direct < serial


def test_metrics_show_each_hosts_state_and_terms_from_the_pipeline() -> None:
    settings = Settings(suspended_hosts=["banned"])
    hosts = directory(
        ("ok", beat(cap("m"), load=0.5)),
        ("banned", beat(cap("m"))),
        ("leaving", beat(cap("m"), draining=True)),
    )
    stats = StatsCollector(settings, hosts)
    view = {h["host_id"]: h for h in stats.host_view()}
    assert {k: h["state"] for k, h in view.items()} == {
        "ok": "eligible",
        "banned": "suspended",
        "leaving": "draining",
    }
    assert list(view["ok"]["terms"]) == list(selection.SCORERS)
    assert view["ok"]["terms"]["load"] == 0.5
    assert stats.snapshot()["score_weights"] == selection.weights_from_settings(settings)
    assert isinstance(stats.host_stats, HostStats)


def test_models_and_serving_hosts_leave_out_engines_that_do_not_answer() -> None:
    """/v1/models and /healthz count only models whose engine answers its health probe."""
    import time

    from llooma.membership import HostDirectory
    from llooma.settings import VERSION
    from llooma.v1.host_pb2 import HostHeartbeat, ModelCapability

    directory = HostDirectory(stale_after_s=2.0, min_version=VERSION)

    def beat(host: str, *models: tuple[str, bool]) -> None:
        heartbeat = HostHeartbeat(
            version=VERSION,
            models=[
                ModelCapability(name=name, capacity=4, engine_unreachable=down)
                for name, down in models
            ],
        )
        directory.members._apply(host, heartbeat.SerializeToString(), "PUT", time.time())

    beat("a", ("up-model", False), ("down-model", True))
    beat("b", ("gone-model", True))
    assert directory.models() == {"up-model"}
    assert [m.key for m in directory.serving()] == ["a"]
    assert {m.key for m in directory.eligible()} == {"a", "b"}
