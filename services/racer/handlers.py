"""Racer: takes task assignments off the pipeline and runs each as a race."""

from __future__ import annotations

from faststream import AckPolicy
from faststream.nats import NatsRouter
from faststream.nats.annotations import NatsMessage
from llooma import subjects
from llooma.runtime import PIPELINE
from llooma.v1.pipeline_pb2 import TaskAssignment

from services.racer.race import Racer

# Each race occupies a worker for its whole stream, so this bounds concurrent races.
MAX_CONCURRENT_RACES = 1024


def build_router(racer: Racer) -> NatsRouter:
    router = NatsRouter()

    # Acked on receipt: a race is not replayed (its client has a stream in flight); if this
    # process dies mid-race, the ingress ends that client's stream with an error event.
    @router.subscriber(
        subjects.PIPELINE_RACER,
        queue=subjects.CONSUMER_RACER,
        stream=PIPELINE,
        max_workers=MAX_CONCURRENT_RACES,
        ack_policy=AckPolicy.ACK_FIRST,
    )
    async def race(message: NatsMessage) -> None:
        await racer.run(TaskAssignment.FromString(message.body))

    return router
