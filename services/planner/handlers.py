"""Planner: stage-1 bypass to the direct path (the split path comes with the DAG work)."""

from __future__ import annotations

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from llooma import bus, subjects
from llooma.v1.common_pb2 import REQUEST_PATH_DIRECT
from llooma.v1.pipeline_pb2 import ChatRequest


class Planner:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def handle(self, msg: Msg) -> None:
        request = ChatRequest.FromString(msg.data)
        request.path = REQUEST_PATH_DIRECT
        await bus.hand_off(
            self._js,
            subjects.PIPELINE_DISPATCHER,
            request.SerializeToString(),
            f"{request.request_id}.dispatcher",
        )
