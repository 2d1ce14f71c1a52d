"""Aggregator: merges node outputs into one answer, in the order the user asked."""

from __future__ import annotations

from faststream.nats import NatsRouter
from faststream.nats.annotations import NatsMessage

from llooma import subjects
from llooma.v1.aggregate_pb2 import AggregatePart, AggregateReply, AggregateRequest

router = NatsRouter()


def merge(parts: list[AggregatePart]) -> str:
    sections = []
    for part in parts:
        body = part.text.strip()
        sections.append(f"{part.label}\n{body}" if part.label else body)
    return "\n\n".join(sections)


@router.subscriber(subjects.AGGREGATE, queue="aggregator")
async def aggregate(message: NatsMessage) -> bytes:
    request = AggregateRequest.FromString(message.body)
    return AggregateReply(text=merge(list(request.parts))).SerializeToString()
