"""The paper's Table II, live: first-token latency by path, fallback and split rates,
orchestration overhead, race wins and cost per successful response.

One `StatsCollector` lives in each ingress. It learns from three sources:

- the ingress itself, per request: the path and the time from accepting the request to its
  first token (`request_started`), a failure before any token (`request_failed`), or a
  refusal (`rejected`);
- every other ingress: each sends what it recorded as an `IngressTally` about once a second
  (`subjects.INGRESS_TALLY`), so every ingress's `/v1/stats` counts the whole cluster's
  requests, not its own process's; `/metrics` stays per process (Prometheus sums instances);
- race events from the racer (`subjects.RACE_EVENT`), replayed `stats_replay_s` back when the
  ingress starts, then live: tasks, fallbacks, wins, and the host statistics behind S(h).
  Tallies are replayed over the same window, so the figures cover the same requests.

Orchestration overhead of a request = the ingress's time to first token minus the winning
attempt's launch offset within its race and that host's own time to first token, i.e. what the
control plane adds on top of the host that answered, apart from time the race deliberately
waited (a hedge delay, or the first-token deadline before a fallback joins). A split request is
measured against the first of its node races to report.

Every update is O(1) per event; percentiles are computed only when someone asks.

Its size (~570 lines): the Table II metrics, their JSON and their Prometheus instruments side
by side, so a metric's two faces cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest

from llooma import bus, subjects
from llooma.host_stats import HostStats
from llooma.membership import HostDirectory
from llooma.names import PATHS, path_name
from llooma.quantiles import percentile
from llooma.replay import Replay
from llooma.selection import Selector, weighted
from llooma.settings import Settings
from llooma.v1.duel_pb2 import DuelResult
from llooma.v1.ledger_pb2 import LedgerSummary
from llooma.v1.race_pb2 import (
    ATTEMPT_ROLE_CONTINUATION,
    ATTEMPT_ROLE_FALLBACK,
    IngressTally,
    RaceEvent,
    RejectionCount,
    RequestStart,
)
from llooma.v1.settlement_pb2 import ATTEMPT_OUTCOME_WON

log = logging.getLogger(__name__)

# Percentiles are over the most recent samples of each path.
LATENCY_SAMPLES = 2048
# Requests waiting for their race event, to measure the overhead (oldest dropped first).
PENDING_REQUESTS = 4096
# The ledger summary is heard as accounting puts it; read again this often in case a put was
# missed while NATS was away.
LEDGER_REREAD_S = 30.0
# Without that subscription (a collector given no connection), reading is all there is.
LEDGER_POLL_S = 2.0
# How often an ingress sends its tally, and how many unsent ones it keeps while NATS is away.
TALLY_INTERVAL_S = 1.0
UNSENT_TALLIES = 600
# GenAI semantic conventions' advice for time-to-first-token histograms, in seconds.
FIRST_TOKEN_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}


# A host turned away by one of these filters shows under its name; by any other, ineligible.
HOST_STATES = {"not_suspended": "suspended", "not_draining": "draining"}


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class Recent:
    """The last `size` samples of one series, and how many there were in all."""

    def __init__(self, size: int = LATENCY_SAMPLES) -> None:
        self.samples: deque[float] = deque(maxlen=size)
        self.count = 0

    def add(self, value: float) -> None:
        self.samples.append(value)
        self.count += 1

    def summary(self) -> dict[str, float | int | None]:
        values = list(self.samples)
        out: dict[str, float | int | None] = {"count": self.count}
        for name, q in QUANTILES.items():
            out[name] = round(percentile(values, q), 1) if values else None
        return out


@dataclass(slots=True)
class _Pending:
    path: str
    first_token_ms: float
    # Served by this ingress: its overhead also goes to this process's /metrics.
    own: bool


def _monotonic_at(unix_nanos: int) -> float | None:
    """The monotonic clock's reading at a past wall-clock instant (None, now, if unknown)."""
    if not unix_nanos:
        return None
    return time.monotonic() - max(0.0, time.time() - unix_nanos / 1e9)


def _first_winner_ms(event: RaceEvent) -> int | None:
    """From the race's start to the first token of the host the client's first token came
    from: the first winner, not a continuation that took over after a handover. Zero is a real
    first-token time (a host on this machine, under a ms) when that host won."""
    return min(
        (
            a.launched_after_ms + a.first_token_ms
            for a in event.attempts
            if a.role != ATTEMPT_ROLE_CONTINUATION
            and (a.first_token_ms or a.outcome == ATTEMPT_OUTCOME_WON)
        ),
        default=None,
    )


class StatsCollector:
    def __init__(self, settings: Settings, hosts: HostDirectory, instance_id: str = "") -> None:
        self._settings = settings
        # Tallies are sent (and this instance's own skipped when read back) only with one.
        self.instance_id = instance_id
        self._outgoing = IngressTally(instance_id=instance_id)
        self._outgoing_rejections: dict[tuple[int, str], int] = {}
        self._js: JetStreamContext | None = None
        self._unsent: deque[tuple[bytes, str]] = deque(maxlen=UNSENT_TALLIES)
        self._tally_sequence = 0
        self._sender: asyncio.Task[None] | None = None
        # Race events that came before their request's tally (first winner's ms).
        self._raced: OrderedDict[str, int] = OrderedDict()
        self._hosts = hosts
        self.host_stats = HostStats()
        self.selector = Selector.from_settings(settings, self.host_stats)
        self.started_unix_ms = int(time.time() * 1000)
        self._first_token = {path: Recent() for path in PATHS}
        self._overhead = {path: Recent() for path in PATHS}
        self._requests = dict.fromkeys(PATHS, 0)
        self._failed_requests = 0
        # Refusals by HTTP status, then reason (the error's code): counters only.
        self._rejections: dict[int, dict[str, int]] = {}
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._tasks = dict.fromkeys(PATHS, 0)
        self._tasks_succeeded = 0
        self._tasks_with_fallback = 0
        self._fallback_wins = 0
        self._wins: dict[tuple[str, str], int] = {}
        self._wins_by_host: dict[str, int] = {}
        self.ledger: LedgerSummary | None = None
        # Requests in flight by model on every live ingress (the capacity gate's count).
        self.cluster_in_flight: Callable[[], Mapping[str, int]] = dict
        self._replays: list[Replay[Any]] = []
        self._poller: asyncio.Task[None] | None = None
        self._summary_subscription: Subscription | None = None
        self._ledger_puts_heard = 0
        self.registry = CollectorRegistry()
        self._reader = PrometheusMetricReader(registry=self.registry)
        self._provider = MeterProvider(
            metric_readers=[self._reader],
            resource=Resource.create({"service.name": "llooma-ingress"}),
        )
        self._instruments()

    # -- OpenTelemetry instruments ---------------------------------------------------------

    def _instruments(self) -> None:
        meter = self._provider.get_meter("llooma.metrics")
        self._ttft_histogram = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="From the ingress accepting a request to its first token, by path",
            explicit_bucket_boundaries_advisory=FIRST_TOKEN_BUCKETS_S,
        )
        self._overhead_histogram = meter.create_histogram(
            "llooma.orchestration.overhead",
            unit="s",
            description="Time to first token minus the winning host's own, by path",
            explicit_bucket_boundaries_advisory=FIRST_TOKEN_BUCKETS_S,
        )
        self._request_counter = meter.create_counter(
            "llooma.requests", description="Requests by path, or failed before a first token"
        )
        self._rejection_counter = meter.create_counter(
            "llooma.requests.rejected",
            description="Requests answered with an error (401, 402, 404, 413, 429, 503, ...), "
            "by status and reason",
        )
        self._task_counter = meter.create_counter(
            "llooma.race.tasks", description="Races by path, outcome and whether a fallback ran"
        )
        self._win_counter = meter.create_counter(
            "llooma.race.wins", description="Successful races won, by host and model"
        )
        meter.create_observable_gauge(
            "llooma.fallback.rate",
            [self._observe_fallback_rate],
            description="Share of races in which a fallback host was launched",
        )
        meter.create_observable_gauge(
            "llooma.split.rate",
            [self._observe_split_rate],
            description="Share of requests answered by a split DAG",
        )
        meter.create_observable_gauge(
            "llooma.cost_per_successful_response",
            [self._observe_cost],
            unit="{micro-credit}",
            description="(user charges + host payouts + fallback cost) / completed responses",
        )
        meter.create_observable_gauge(
            "llooma.host.score",
            [self._observe_scores],
            description="S(h) of each live host (lower is better)",
        )

    def _observe_fallback_rate(self, _: CallbackOptions) -> Iterable[Observation]:
        rate = _ratio(self._tasks_with_fallback, sum(self._tasks.values()))
        return [] if rate is None else [Observation(rate)]

    def _observe_split_rate(self, _: CallbackOptions) -> Iterable[Observation]:
        rate = _ratio(self._requests["split"], sum(self._requests.values()))
        return [] if rate is None else [Observation(rate)]

    def _observe_cost(self, _: CallbackOptions) -> Iterable[Observation]:
        if self.ledger is None or not self.ledger.completed_responses:
            return []
        return [Observation(self.ledger.cost_per_successful_response_micros)]

    def _observe_scores(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(h["score"], {"host": h["host_id"]}) for h in self.host_view()]

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    # -- what the ingress reports, once per request ----------------------------------------

    def request_started(self, request_id: str, path: str, first_token_s: float) -> None:
        attributes = {"llooma.path": path}
        self._request_counter.add(1, attributes)
        self._ttft_histogram.record(first_token_s, attributes)
        first_token_ms = first_token_s * 1000.0
        self._outgoing.started.append(
            RequestStart(request_id=request_id, path=path, first_token_ms=first_token_ms)
        )
        self._count_start(request_id, path, first_token_ms, own=True)

    def request_failed(self) -> None:
        self._request_counter.add(1, {"llooma.path": "none"})
        self._outgoing.failed_before_first_token += 1
        self._failed_requests += 1

    def rejected(self, status: int, reason: str) -> None:
        self._rejection_counter.add(1, {"http.response.status_code": status, "error.type": reason})
        key = (status, reason)
        self._outgoing_rejections[key] = self._outgoing_rejections.get(key, 0) + 1
        self._count_rejections(status, reason, 1)

    def record_tally(self, tally: IngressTally) -> None:
        """Another ingress's requests and refusals (this one's were counted as they came)."""
        if tally.instance_id == self.instance_id:
            return
        for start in tally.started:
            self._count_start(start.request_id, start.path, start.first_token_ms, own=False)
        self._failed_requests += tally.failed_before_first_token
        for rejection in tally.rejections:
            self._count_rejections(rejection.status, rejection.code, rejection.count)

    def _count_start(self, request_id: str, path: str, first_token_ms: float, own: bool) -> None:
        if path not in self._requests:
            return  # from a newer ingress that knows a path this one does not
        self._requests[path] += 1
        self._first_token[path].add(first_token_ms)
        pending = _Pending(path, first_token_ms, own)
        host_ms = self._raced.pop(request_id, None)
        if host_ms is not None:
            self._count_overhead(pending, host_ms)
            return
        self._pending[request_id] = pending
        if len(self._pending) > PENDING_REQUESTS:
            self._pending.popitem(last=False)

    def _count_rejections(self, status: int, reason: str, count: int) -> None:
        by_reason = self._rejections.setdefault(status, {})
        by_reason[reason] = by_reason.get(reason, 0) + count

    def _count_overhead(self, pending: _Pending, host_ms: int) -> None:
        overhead_ms = max(0.0, pending.first_token_ms - host_ms)
        self._overhead[pending.path].add(overhead_ms)
        if pending.own:
            self._overhead_histogram.record(overhead_ms / 1000.0, {"llooma.path": pending.path})

    # -- race events -----------------------------------------------------------------------

    def record_race(self, event: RaceEvent) -> None:
        # A race replayed at start is dated when it ran, so it leaves the p95 window on time.
        self.host_stats.record(event, _monotonic_at(event.finished_unix_nanos))
        path = path_name(event.path)
        self._tasks[path] += 1
        fallback = any(a.role == ATTEMPT_ROLE_FALLBACK for a in event.attempts)
        self._tasks_with_fallback += fallback
        self._task_counter.add(
            1,
            {
                "llooma.path": path,
                "llooma.outcome": "succeeded" if event.succeeded else "failed",
                "llooma.fallback": fallback,
            },
        )
        winner = next(
            (
                a
                for a in event.attempts
                if a.host_id == event.winner_host_id and a.outcome == ATTEMPT_OUTCOME_WON
            ),
            None,
        )
        if event.succeeded and winner is not None:
            self._tasks_succeeded += 1
            self._fallback_wins += winner.role == ATTEMPT_ROLE_FALLBACK
            key = (winner.host_id, winner.model)
            self._wins[key] = self._wins.get(key, 0) + 1
            self._wins_by_host[winner.host_id] = self._wins_by_host.get(winner.host_id, 0) + 1
            self._win_counter.add(
                1, {"llooma.host": winner.host_id, "gen_ai.response.model": key[1]}
            )
        host_ms = _first_winner_ms(event)
        if host_ms is None:
            return
        pending = self._pending.pop(event.request_id, None)
        if pending is not None:
            self._count_overhead(pending, host_ms)
        elif event.request_id not in self._raced:
            # Its request's tally may come later (another ingress's, sent once a second); a
            # split request is measured against the first of its node races.
            self._raced[event.request_id] = host_ms
            if len(self._raced) > PENDING_REQUESTS:
                self._raced.popitem(last=False)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, js: JetStreamContext, nc: Client | None = None) -> None:
        replay_s = self._settings.stats_replay_s
        # Duel results feed the quality term of S(h), as in the dispatcher.
        self._replays = [
            Replay(
                subjects.RACE_EVENT,
                subjects.EVENTS_STREAM,
                RaceEvent.FromString,
                self.record_race,
                replay_s,
            ),
            Replay(
                subjects.SETTLEMENT_DUEL,
                subjects.SETTLEMENT_STREAM,
                DuelResult.FromString,
                self.host_stats.record_duel,
                replay_s,
            ),
            Replay(
                subjects.INGRESS_TALLY,
                subjects.EVENTS_STREAM,
                IngressTally.FromString,
                self.record_tally,
                replay_s,
            ),
        ]
        for replay in self._replays:
            await replay.start(js)
        if nc is not None:
            summary_subject = subjects.kv_put_subject(
                subjects.LEDGER_BUCKET, subjects.LEDGER_SUMMARY_KEY
            )
            self._summary_subscription = await nc.subscribe(summary_subject, cb=self._heard_ledger)
        self._poller = asyncio.create_task(self._read_ledger(js), name="ledger-summary")
        if self.instance_id:
            self._js = js
            self._sender = asyncio.create_task(self._send_tallies(js), name="ingress-tally")

    async def _send_tallies(self, js: JetStreamContext) -> None:
        """Once a second, what this ingress recorded since; kept and resent in order while
        NATS is away (each id sent once: a resend after a lost ack is dropped)."""
        while True:
            await asyncio.sleep(TALLY_INTERVAL_S)
            await self.send_tally(js)

    async def send_tally(self, js: JetStreamContext) -> None:
        outgoing = self._outgoing
        outgoing.rejections.extend(
            RejectionCount(status=status, code=code, count=count)
            for (status, code), count in self._outgoing_rejections.items()
        )
        self._outgoing_rejections = {}
        if outgoing.started or outgoing.failed_before_first_token or outgoing.rejections:
            self._tally_sequence += 1
            msg_id = f"{self.instance_id}.tally.{self._tally_sequence}"
            self._unsent.append((outgoing.SerializeToString(), msg_id))
            self._outgoing = IngressTally(instance_id=self.instance_id)
        while self._unsent:
            payload, msg_id = self._unsent[0]
            try:
                await bus.hand_off(js, subjects.INGRESS_TALLY, payload, msg_id)
            except Exception as error:
                log.debug("tally not sent yet: %s", error)
                return
            self._unsent.popleft()

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        if self._js is not None:
            # The last second's requests: the other ingresses count them too.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.send_tally(self._js)
        if self._summary_subscription is not None:
            with contextlib.suppress(Exception):
                await self._summary_subscription.unsubscribe()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for replay in self._replays:
            await replay.stop()
        self._provider.shutdown()

    async def _heard_ledger(self, msg: Msg) -> None:
        self._ledger_puts_heard += 1
        if msg.data:
            self.ledger = LedgerSummary.FromString(msg.data)

    async def _read_ledger(self, js: JetStreamContext) -> None:
        """Accounting puts the summary after each settled batch; until it exists: None."""
        bucket: KeyValue | None = None
        while True:
            heard = self._ledger_puts_heard
            try:
                if bucket is None:
                    bucket = await js.key_value(subjects.LEDGER_BUCKET)
                entry = await bucket.get(subjects.LEDGER_SUMMARY_KEY)
                # A put heard while reading is newer than what was read.
                if entry.value and heard == self._ledger_puts_heard:
                    self.ledger = LedgerSummary.FromString(entry.value)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.debug("no ledger summary yet: %s", error)
            await asyncio.sleep(LEDGER_REREAD_S if self._summary_subscription else LEDGER_POLL_S)

    # -- the JSON snapshot (/v1/stats, the status page) ------------------------------------

    def host_view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        deadline_ms = self._settings.first_token_deadline_ms
        ledger = {line.host_id: line for line in self.ledger.hosts} if self.ledger else {}
        view = []
        for member in sorted(self._hosts.members.all(), key=lambda m: m.key):
            beat = member.heartbeat
            staleness_s = member.staleness_s(now)
            terms = self.selector.host_terms(member, deadline_ms, now)
            rejection = self.selector.rejection(member, now)
            state = HOST_STATES.get(rejection, "ineligible") if rejection else "eligible"
            p95 = self.host_stats.p95_ms(member.key)
            line = ledger.get(member.key)
            view.append(
                {
                    "host_id": member.key,
                    "state": state,
                    "version": beat.version,
                    "models": [
                        {
                            "name": cap.name,
                            "stake": cap.stake,
                            "capacity": cap.capacity,
                            "in_flight": cap.in_flight,
                        }
                        for cap in beat.models
                    ],
                    "stake": beat.stake,
                    "load": round(beat.load, 4),
                    "staleness_s": round(staleness_s, 3),
                    "p95_first_token_ms": None if p95 is None else round(p95, 1),
                    "error_rate": round(self.host_stats.error_rate(member.key), 4),
                    "terms": {name: round(value, 4) for name, value in terms.items()},
                    "score": round(weighted(terms, self.selector.weights), 4),
                    "wins": self._wins_by_host.get(member.key, 0),
                    "payouts_micros": line.payouts_micros if line else None,
                    "quality": line.quality if line else None,
                }
            )
        return view

    def snapshot(self) -> dict[str, Any]:
        requests = sum(self._requests.values())
        tasks = sum(self._tasks.values())
        ledger = self.ledger
        return {
            "generated_unix_ms": int(time.time() * 1000),
            "since_unix_ms": self.started_unix_ms,
            "replay_s": self._settings.stats_replay_s,
            "first_token_deadline_ms": self._settings.first_token_deadline_ms,
            "score_weights": dict(self.selector.weights),
            "requests": {
                "total": requests,
                "by_path": dict(self._requests),
                "failed_before_first_token": self._failed_requests,
            },
            # Live, not tallied: every ingress's requests in flight by model, as the capacity
            # gate counts them (services/ingress/capacity.py).
            "in_flight_by_model": {
                model: count for model, count in sorted(self.cluster_in_flight().items()) if count
            },
            "rejections": {
                "total": sum(sum(r.values()) for r in self._rejections.values()),
                "by_status": {
                    str(status): dict(sorted(reasons.items()))
                    for status, reasons in sorted(self._rejections.items())
                },
            },
            "first_token_ms": {p: self._first_token[p].summary() for p in PATHS},
            "overhead_ms": {p: self._overhead[p].summary() for p in PATHS},
            "split_rate": _ratio(self._requests["split"], requests),
            "fallback": {
                "rate": _ratio(self._tasks_with_fallback, tasks),
                "tasks_with_fallback": self._tasks_with_fallback,
                "fallback_wins": self._fallback_wins,
                "request_share": _ratio(self._requests["fallback"], requests),
            },
            "tasks": {
                "total": tasks,
                "by_path": dict(self._tasks),
                "succeeded": self._tasks_succeeded,
                "failed": tasks - self._tasks_succeeded,
            },
            "race_wins": [
                {
                    "host_id": host,
                    "model": model,
                    "wins": wins,
                    "share": round(wins / self._tasks_succeeded, 4),
                }
                for (host, model), wins in sorted(self._wins.items(), key=lambda kv: -kv[1])
            ],
            "hosts": self.host_view(),
            "cost": {
                "cost_per_successful_response_micros": (
                    ledger.cost_per_successful_response_micros
                    if ledger is not None and ledger.completed_responses
                    else None
                ),
                "completed_responses": ledger.completed_responses if ledger else 0,
                "user_charges_micros": ledger.user_charges_micros if ledger else 0,
                "host_payouts_micros": ledger.host_payouts_micros if ledger else 0,
                "fallback_cost_micros": ledger.fallback_cost_micros if ledger else 0,
                "updated_unix_ms": ledger.updated_unix_nanos // 1_000_000 if ledger else None,
            },
        }
