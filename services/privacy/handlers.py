"""Privacy mediator (paper II-E): direct identifiers become reversible placeholders before
any host-bound message is built. The mapping goes only to the ingress that restores the
answer (on its own reply subject, which no host credential can read) and is dropped there
when the request ends; it is never logged."""

from __future__ import annotations

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.planning import PlannerConfig, fast_path
from llooma.privacy import Mapping, redact
from llooma.v1.common_pb2 import REQUEST_PATH_DIRECT
from llooma.v1.pipeline_pb2 import (
    PRIVACY_MODE_OFF,
    PRIVACY_MODE_STRICT,
    ChatRequest,
    ClientEvent,
    PlaceholderEntry,
    PrivacyMapping,
)


class Mediator:
    def __init__(self, nc: Client, js: JetStreamContext, planning: PlannerConfig) -> None:
        self._nc = nc
        self._js = js
        self._planning = planning

    async def handle(self, msg: Msg) -> None:
        request = ChatRequest.FromString(msg.data)
        if request.privacy != PRIVACY_MODE_OFF:
            mapping = Mapping()
            strict = request.privacy == PRIVACY_MODE_STRICT
            for message in request.messages:
                message.content = redact(message.content, strict=strict, mapping=mapping).text
            request.privacy_redacted = True
            if mapping:
                # Before the hand-off, so it arrives before any token can. Nothing redacted,
                # nothing sent: the ingress restores with an empty mapping by itself (it knows
                # the mode it asked for), which spares it a wake-up on the request's path.
                entries = [PlaceholderEntry(placeholder=p, original=o) for p, o in mapping.items()]
                event = ClientEvent(mapping=PrivacyMapping(entries=entries))
                await self._nc.publish(request.reply_subject, event.SerializeToString())
        # The planner's stage 1 runs here, on the redacted request: a bypassed request (most
        # short ones) goes straight to the dispatcher, sparing a process and a hand-off.
        plan = fast_path(request, self._planning)
        if plan is None:
            stage, subject = "planner", subjects.PIPELINE_PLANNER
        else:
            request.plan.CopyFrom(plan)
            request.path = REQUEST_PATH_DIRECT
            stage, subject = "dispatcher", subjects.PIPELINE_DISPATCHER
        await bus.hand_off(
            self._js, subject, request.SerializeToString(), f"{request.request_id}.{stage}"
        )
