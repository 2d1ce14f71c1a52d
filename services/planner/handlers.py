"""Planner: stage-1 bypass to the direct path (the split path comes with the DAG work)."""

from __future__ import annotations

from faststream.nats import NatsRouter
from faststream.nats.annotations import JsClient, NatsMessage
from llooma import bus, subjects
from llooma.runtime import PIPELINE
from llooma.v1.common_pb2 import REQUEST_PATH_DIRECT
from llooma.v1.pipeline_pb2 import ChatRequest

router = NatsRouter()


@router.subscriber(
    subjects.PIPELINE_PLANNER,
    queue=subjects.CONSUMER_PLANNER,
    stream=PIPELINE,
    max_workers=64,
)
async def plan(message: NatsMessage, js: JsClient) -> None:
    request = ChatRequest.FromString(message.body)
    request.path = REQUEST_PATH_DIRECT
    await bus.hand_off(
        js,
        subjects.PIPELINE_DISPATCHER,
        request.SerializeToString(),
        f"{request.request_id}.dispatcher",
    )
