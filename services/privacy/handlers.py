"""Privacy: redact identifiers before anything host-bound is built (pass-through for now)."""

from __future__ import annotations

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.v1.pipeline_pb2 import ChatRequest


class Mediator:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def handle(self, msg: Msg) -> None:
        request = ChatRequest.FromString(msg.data)
        request.privacy_redacted = False
        await bus.hand_off(
            self._js,
            subjects.PIPELINE_PLANNER,
            request.SerializeToString(),
            f"{request.request_id}.planner",
        )
