"""Dispatcher: eligibility, score S(h), stake-weighted pick; hands the task to the racer."""

from __future__ import annotations

import random
import time
import uuid

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.membership import HostDirectory
from llooma.scoring import Candidate, ScoreTerms, ScoreWeights, host_score, pick_hosts
from llooma.settings import ORCHESTRATED_MODEL, Settings
from llooma.v1.common_pb2 import ERROR_CODE_NO_ELIGIBLE_HOST, ErrorDetail
from llooma.v1.pipeline_pb2 import ChatRequest, ClientEvent, HostCandidate, TaskAssignment


class Dispatcher:
    def __init__(
        self, settings: Settings, hosts: HostDirectory, nc: Client, js: JetStreamContext
    ) -> None:
        self._nc = nc
        self._js = js
        self._settings = settings
        self._hosts = hosts
        self._weights = ScoreWeights()
        self._rng = random.Random()

    def candidates(self, model: str) -> list[Candidate]:
        orchestrated = model == ORCHESTRATED_MODEL
        excluded = set(self._settings.orchestration_excluded_models)
        now = time.monotonic()
        found: list[Candidate] = []
        for member in self._hosts.eligible(None if orchestrated else model):
            beat = member.heartbeat
            terms = ScoreTerms(
                load=beat.load,
                latency_p95=0.0,
                staleness=member.staleness_s(now) / self._settings.host_stale_after_s,
                error_rate=0.0,
            )
            score = host_score(terms, self._weights)
            found.extend(
                Candidate(member.key, cap.name, score, cap.stake)
                for cap in beat.models
                if (cap.name not in excluded if orchestrated else cap.name == model)
            )
        return found

    def assign(self, request: ChatRequest) -> TaskAssignment | None:
        chosen = pick_hosts(
            self.candidates(request.model),
            k=self._settings.race_width,
            bucket_size=self._settings.best_bucket_size,
            rng=self._rng,
        )
        if not chosen:
            return None
        deadline = request.first_token_deadline_ms or self._settings.first_token_deadline_ms
        return TaskAssignment(
            request=request,
            task_id=uuid.uuid4().hex,
            hosts=[
                HostCandidate(host_id=c.host_id, score=c.score, stake=c.stake, model=c.model)
                for c in chosen
            ],
            first_token_deadline_ms=deadline,
            stall_deadline_ms=self._settings.stall_deadline_ms,
        )

    async def handle(self, msg: Msg) -> None:
        request = ChatRequest.FromString(msg.data)
        assignment = self.assign(request)
        if assignment is None:
            failure = ClientEvent(
                failed=ErrorDetail(
                    code=ERROR_CODE_NO_ELIGIBLE_HOST,
                    message=f"no eligible host serves model {request.model!r} right now",
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
