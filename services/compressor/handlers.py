"""Compressor: shrinks node outputs before they are injected into dependants."""

from __future__ import annotations

from faststream.nats import NatsRouter
from faststream.nats.annotations import NatsMessage

from llooma import subjects
from llooma.v1.compress_pb2 import CompressReply, CompressRequest

ELISION_MARKER = " [...] "

router = NatsRouter()


def truncate(text: str, budget: int) -> str:
    """Keep head and tail within budget characters (structure-aware compression comes later)."""
    if len(text) <= budget:
        return text
    if budget <= len(ELISION_MARKER):
        return text[:budget]
    room = budget - len(ELISION_MARKER)
    head = room * 6 // 10
    return text[:head] + ELISION_MARKER + text[len(text) - (room - head) :]


@router.subscriber(subjects.COMPRESS, queue="compressor")
async def compress(message: NatsMessage) -> bytes:
    request = CompressRequest.FromString(message.body)
    return CompressReply(text=truncate(request.text, request.budget)).SerializeToString()
