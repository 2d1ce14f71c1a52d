"""Privacy: redact identifiers before anything host-bound is built (pass-through for now)."""

from __future__ import annotations

from faststream.nats import NatsRouter
from faststream.nats.annotations import JsClient, NatsMessage
from llooma import bus, subjects
from llooma.runtime import PIPELINE
from llooma.v1.pipeline_pb2 import ChatRequest

router = NatsRouter()


@router.subscriber(
    subjects.PIPELINE_PRIVACY,
    queue=subjects.CONSUMER_PRIVACY,
    stream=PIPELINE,
    max_workers=64,
)
async def mediate(message: NatsMessage, js: JsClient) -> None:
    request = ChatRequest.FromString(message.body)
    request.privacy_redacted = False
    await bus.hand_off(
        js, subjects.PIPELINE_PLANNER, request.SerializeToString(), f"{request.request_id}.planner"
    )
