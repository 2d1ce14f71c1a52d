"""Planner (paper II-A): stage 1 bypasses short, single-sentence or small-budget requests;
stage 2 builds a DAG from the prompt's structure (or, optionally, a split call) and splits
only if L_split + eps < L_dir. The decision and both estimates travel with the request."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.membership import HostDirectory
from llooma.planning import (
    SPLIT_INSTRUCTION,
    ModelRates,
    bypass_plan,
    decide,
    decompose,
    direct_plan,
    estimate_ms,
    fast_path,
    is_split,
    parse_split_reply,
    planner_config,
    validate,
)
from llooma.selection import Ask, Selector
from llooma.settings import Settings
from llooma.v1.common_pb2 import REQUEST_PATH_DIRECT, REQUEST_PATH_SPLIT, ChatMessage
from llooma.v1.pipeline_pb2 import ChatRequest, ClientEvent
from llooma.v1.plan_pb2 import PLAN_KIND_UNSPECIFIED, Plan
from llooma.v1.race_pb2 import RaceEvent

log = logging.getLogger(__name__)


class Planner:
    def __init__(
        self,
        settings: Settings,
        nc: Client,
        js: JetStreamContext,
        instance_id: str,
        hosts: HostDirectory | None = None,
    ) -> None:
        self._settings = settings
        self._hosts = hosts
        self._selector = Selector.from_settings(settings)
        self._nc = nc
        self._js = js
        self._instance_id = instance_id
        self._config = planner_config(settings)
        self._rates: dict[str, ModelRates] = {}
        self._split_rates = ModelRates()

    async def on_race_event(self, msg: Msg) -> None:
        event = RaceEvent.FromString(msg.data)
        if not event.succeeded or not event.first_token_ms:
            return
        rates = self._rates.setdefault(event.model, ModelRates())
        rates.first_token_ms.append(float(event.first_token_ms))
        streaming_s = (event.duration_ms - event.first_token_ms) / 1000.0
        if event.output_tokens > 1 and streaming_s > 0:
            rates.tokens_per_s.append((event.output_tokens - 1) / streaming_s)

    def engines(self, model: str) -> int:
        """Independent engines that could run the parts (0: unknown): hosts and models on one
        shared engine are one, so splitting across them buys no parallelism."""
        if self._hosts is None:
            return 0
        return self._selector.engines(self._hosts.members.all(), Ask(model))

    async def handle(self, msg: Msg) -> None:
        request = ChatRequest.FromString(msg.data)
        if request.plan.kind == PLAN_KIND_UNSPECIFIED:
            request.plan.CopyFrom(await self.plan(request))
        request.path = REQUEST_PATH_SPLIT if is_split(request.plan) else REQUEST_PATH_DIRECT
        await bus.hand_off(
            self._js,
            subjects.PIPELINE_DISPATCHER,
            request.SerializeToString(),
            f"{request.request_id}.dispatcher",
        )

    async def plan(self, request: ChatRequest) -> Plan:
        fast = fast_path(request, self._config)
        if fast is not None:
            return fast
        prompt = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        plan = decompose(prompt)
        split_call_ms = 0.0
        if plan is None and self._settings.planner_split_model:
            started = time.monotonic()
            try:
                plan = await self._split_call(request, prompt)
            except (ValueError, TimeoutError) as error:
                return direct_plan(f"split call failed: {error}")
            split_call_ms = (time.monotonic() - started) * 1000
        if plan is None:
            return direct_plan("no structure to split")
        problem = validate(plan, self._config.max_nodes)
        if problem is not None:
            return direct_plan(f"invalid plan: {problem}", source=plan.source)
        rates = self._rates.get(request.model, ModelRates())
        direct_ms, split_ms = estimate_ms(
            plan,
            rates,
            request.params.max_tokens,
            self._config,
            split_call_ms,
            engines=self.engines(request.model),
        )
        plan.direct_estimate_ms = direct_ms
        plan.split_estimate_ms = split_ms
        decide(
            plan,
            split=split_ms + self._config.epsilon_ms < direct_ms,
            reason=f"split not faster ({split_ms:.0f} vs {direct_ms:.0f} ms)",
        )
        return plan

    async def _split_call(self, request: ChatRequest, prompt: str) -> Plan:
        """Ask a model for a JSON DAG, through the same dispatcher and racer as any task."""
        call_id = uuid.uuid4().hex
        reply_subject = subjects.planner_reply(self._instance_id, call_id)
        events: asyncio.Queue[ClientEvent] = asyncio.Queue()

        async def collect(msg: Msg) -> None:
            events.put_nowait(ClientEvent.FromString(msg.data))

        subscription = await self._nc.subscribe(reply_subject, cb=collect)
        try:
            call = ChatRequest(
                request_id=f"{request.request_id}-split",
                model=self._settings.planner_split_model,
                messages=[
                    ChatMessage(role="system", content=SPLIT_INSTRUCTION),
                    ChatMessage(role="user", content=prompt),
                ],
                reply_subject=reply_subject,
                api_key_id=request.api_key_id,
                accepted_unix_nanos=time.time_ns(),
                path=REQUEST_PATH_DIRECT,
                plan=bypass_plan("split call"),
            )
            await bus.hand_off(
                self._js, subjects.PIPELINE_DISPATCHER, call.SerializeToString(), call.request_id
            )
            text: list[str] = []
            async with asyncio.timeout(self._settings.planner_split_timeout_ms / 1000):
                while True:
                    event = await events.get()
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        text.append(event.delta.text)
                    elif kind == "finished":
                        return parse_split_reply("".join(text))
                    elif kind == "failed":
                        raise ValueError(event.failed.message)
        finally:
            await subscription.unsubscribe()
