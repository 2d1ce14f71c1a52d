"""Dispatcher: eligibility, score S(h), stake-weighted pick; hands the task to the racer."""

from __future__ import annotations

import logging
import random
import uuid

from google.protobuf.message import DecodeError
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llooma import bus, counters, subjects
from llooma.host_stats import HostStats
from llooma.ledger.stakes import StakeBook
from llooma.membership import HostDirectory
from llooma.planning import decide, is_split
from llooma.selection import Ask, Candidate, Selector, asked_features
from llooma.settings import Settings
from llooma.v1.common_pb2 import (
    ERROR_CODE_NO_ELIGIBLE_HOST,
    REQUEST_PATH_DIRECT,
    TASK_KIND_EMBEDDING,
    ErrorDetail,
)
from llooma.v1.pipeline_pb2 import ChatRequest, ClientEvent, HostCandidate, TaskAssignment
from llooma.v1.race_pb2 import RaceEvent
from services.dispatcher.dag import DagRunner

log = logging.getLogger(__name__)

MAX_FALLBACK_CANDIDATES = 3
EMBEDDINGS = frozenset({"embeddings"})


def as_candidate(c: Candidate) -> HostCandidate:
    return HostCandidate(
        host_id=c.host_id,
        score=c.score,
        stake=c.stake,
        model=c.model,
        assistant_prefill=c.assistant_prefill,
    )


def requested_features(request: ChatRequest) -> frozenset[str]:
    """The ModelFeatures a request needs of its hosts: its parameters', and embeddings."""
    features = asked_features(request.params)
    return features | EMBEDDINGS if request.kind == TASK_KIND_EMBEDDING else features


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        hosts: HostDirectory,
        nc: Client,
        js: JetStreamContext,
        instance_id: str,
        stakes: StakeBook | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._settings = settings
        self._hosts = hosts
        self._rng = random.Random()
        self.stats = HostStats()
        self.stakes = stakes or StakeBook()
        self.selector = Selector.from_settings(settings, self.stats, self.stakes.locked_micros)
        self.dag = DagRunner(nc, js, instance_id, self.assign)

    async def on_race_event(self, msg: Msg) -> None:
        try:
            event = RaceEvent.FromString(msg.data)
        except DecodeError:
            counters.count("poison_dropped.race_event")
            return
        self.stats.record(event)

    def candidates(
        self, model: str, deadline_ms: int, features: frozenset[str] = frozenset()
    ) -> list[Candidate]:
        ask = Ask(model, features, deadline_ms=deadline_ms)
        return self.selector.candidates(self._hosts.members.all(), ask)

    def _fallback(self, candidates: list[Candidate], chosen: list[Candidate]) -> list[Candidate]:
        taken = {c.host_id for c in chosen}
        rest = sorted(
            (c for c in candidates if c.host_id not in taken), key=lambda c: (c.score, c.host_id)
        )
        pool = set(self._settings.fallback_hosts)
        trusted = [c for c in rest if c.host_id in pool]
        if not trusted and not self._settings.fallback_to_any_host:
            return []
        picked: list[Candidate] = []
        for candidate in trusted or rest:
            if candidate.host_id not in {p.host_id for p in picked}:
                picked.append(candidate)
        return picked[:MAX_FALLBACK_CANDIDATES]

    def _hedge_delay_ms(self, model: str, first: Candidate, deadline_ms: int) -> int:
        setting = self._settings.hedge_delay_by_model.get(model)
        if not setting:
            return 0
        if setting == "p90":
            observed = self.stats.p90_ms(first.host_id)
            return int(observed) if observed is not None else deadline_ms // 2
        return int(setting)

    def assign(self, request: ChatRequest, avoid: set[str] | None = None) -> TaskAssignment | None:
        """Hosts for one task; `avoid` (hosts busy with sibling nodes) is skipped if possible."""
        deadline_ms = self._settings.deadline_ms(request.model, request.first_token_deadline_ms)
        candidates = self.candidates(request.model, deadline_ms, requested_features(request))
        k = request.race_width or self._settings.race_width
        bucket = self._settings.best_bucket_size
        free = [c for c in candidates if c.host_id not in (avoid or ())]
        chosen = self.selector.pick(free, k=k, bucket_size=bucket, rng=self._rng)
        if len(chosen) < k and avoid:
            busy = [c for c in candidates if c.host_id in avoid]
            chosen += self.selector.pick(busy, k=k - len(chosen), bucket_size=bucket, rng=self._rng)
        if not chosen:
            return None
        return TaskAssignment(
            request=request,
            task_id=uuid.uuid4().hex,
            hosts=[as_candidate(c) for c in chosen],
            fallback=[as_candidate(c) for c in self._fallback(candidates, chosen)],
            first_token_deadline_ms=deadline_ms,
            stall_deadline_ms=self._settings.stall_deadline_ms,
            hedge_delay_ms=self._hedge_delay_ms(chosen[0].model, chosen[0], deadline_ms),
        )

    async def handle(self, msg: Msg) -> None:
        request = ChatRequest.FromString(msg.data)
        if is_split(request.plan) and self.candidates(request.model, 1):
            try:
                await self.dag.start(request)
                return
            except Exception as error:
                # No aggregator answered: the direct path still answers the request.
                log.warning("split of %s fell back to direct: %s", request.request_id, error)
                decide(request.plan, split=False, reason=f"split could not start ({error})")
                request.path = REQUEST_PATH_DIRECT
        assignment = self.assign(request)
        if assignment is None:
            # Never a silent downgrade: a request for tools waits for a host that has them.
            features = requested_features(request)
            needs = f" with {', '.join(sorted(features))}" if features else ""
            failure = ClientEvent(
                failed=ErrorDetail(
                    code=ERROR_CODE_NO_ELIGIBLE_HOST,
                    message=f"no eligible host serves model {request.model!r}{needs} right now",
                )
            )
            await self._nc.publish(request.reply_subject, failure.SerializeToString())
            return
        await bus.hand_off(
            self._js,
            subjects.PIPELINE_RACER,
            assignment.SerializeToString(),
            f"{request.request_id}.racer",
        )
