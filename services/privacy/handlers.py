"""Privacy mediator (paper II-E): direct identifiers become reversible placeholders before
any host-bound message is built. The mapping goes only to the ingress that restores the
answer (on its own reply subject, which no host credential can read) and is dropped there
when the request ends; it is never logged."""

from __future__ import annotations

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.privacy import Mapping, redact
from llooma.v1.pipeline_pb2 import (
    PRIVACY_MODE_OFF,
    PRIVACY_MODE_STRICT,
    ChatRequest,
    ClientEvent,
    PlaceholderEntry,
    PrivacyMapping,
)


class Mediator:
    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self._nc = nc
        self._js = js

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
        await bus.hand_off(
            self._js,
            subjects.PIPELINE_PLANNER,
            request.SerializeToString(),
            f"{request.request_id}.planner",
        )
