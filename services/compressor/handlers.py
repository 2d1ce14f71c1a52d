"""Compressor: deterministic structural compression of node outputs (paper II-C)."""

from __future__ import annotations

from faststream.nats import NatsRouter
from faststream.nats.annotations import NatsMessage

from llooma import subjects, tracing
from llooma.compress import compress
from llooma.v1.compress_pb2 import CompressReply, CompressRequest

router = NatsRouter()


@router.subscriber(subjects.COMPRESS, queue="compressor")
async def compress_text(message: NatsMessage) -> bytes:
    with tracing.consumer_span(subjects.COMPRESS, message.headers):
        request = CompressRequest.FromString(message.body)
        return CompressReply(text=compress(request.text, request.budget)).SerializeToString()
