"""The aggregator's side of a node race whose racer stopped: what it hands another racer, and
which events it hears afterwards (fakes for NATS; the whole path runs in
tests/reliability/test_kills.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from nats.aio.client import Client
from nats.js import JetStreamContext

from llooma import subjects
from llooma.membership import ServiceDirectory
from llooma.v1.common_pb2 import Usage
from llooma.v1.pipeline_pb2 import (
    ClientDelta,
    ClientEvent,
    ClientFinished,
    ClientStarted,
    RaceResume,
)
from llooma.v1.plan_pb2 import AggregationReady, AggregationStart, PlanNode
from services.aggregator.handlers import Aggregator


@dataclass
class Wire:
    """Publishes (core and JetStream) by subject."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)

    async def publish(self, subject: str, payload: bytes, **_: Any) -> None:
        self.sent.append((subject, payload))

    def on(self, subject: str) -> list[bytes]:
        return [payload for sent_to, payload in self.sent if sent_to == subject]


@dataclass
class Racers:
    stopped: set[str] = field(default_factory=set)

    def gone(self, instance_id: str, stale_after_s: float | None = None) -> bool:
        return instance_id in self.stopped


def event(subject: str, message: ClientEvent) -> Any:
    return SimpleNamespace(subject=subject, data=message.SerializeToString())


def test_a_node_whose_racer_stopped_is_resumed_from_what_arrived_and_the_old_racer_unheard() -> (
    None
):
    async def scenario() -> None:
        wire, racers = Wire(), Racers()
        aggregator = Aggregator(
            cast(Client, wire),
            "agg-1",
            cast(JetStreamContext, wire),
            cast(ServiceDirectory, racers),
        )
        start = AggregationStart(
            request_id="r1",
            reply_subject="llooma.v1.reply.ingress-1.r1",
            nodes=[PlanNode(node_id="n1", label="1.", prompt="p", visible=True)],
            node_done_subject="llooma.v1.dag.d1.done",
        )
        replies: list[bytes] = []

        async def respond(data: bytes) -> None:
            replies.append(data)

        start_msg: Any = SimpleNamespace(data=start.SerializeToString(), respond=respond)
        await aggregator.on_start(start_msg)
        prefix = AggregationReady.FromString(replies[0]).node_subject_prefix
        first = subjects.aggregation_node(prefix, "n1")
        started = ClientEvent(started=ClientStarted(racer_instance_id="racer-1"))
        await aggregator.on_node_event(event(first, started))
        for text in ("Once", " upon"):
            delta = ClientEvent(delta=ClientDelta(text=text, tokens=1))
            await aggregator.on_node_event(event(first, delta))

        await aggregator.resume_stopped_racers()
        assert wire.on(subjects.PIPELINE_RESUME) == []  # racer-1 still beats
        racers.stopped.add("racer-1")
        await aggregator.resume_stopped_racers()
        await aggregator.resume_stopped_racers()  # asked once, not at every check
        [asked] = wire.on(subjects.PIPELINE_RESUME)
        resume = RaceResume.FromString(asked)
        assert (resume.request_id, resume.node_id, resume.racer_instance_id) == (
            "r1",
            "n1",
            "racer-1",
        )
        assert (resume.emitted, resume.delivered_tokens) == ("Once upon", 2)
        assert resume.reply_subject != first
        assert subjects.aggregation_node_ids(resume.reply_subject) == ("r1", "n1", 1)

        # The old racer, only slow, is no longer heard; the new one finishes the node.
        late = ClientEvent(delta=ClientDelta(text=" LATE", tokens=1))
        await aggregator.on_node_event(event(first, late))
        resumed = ClientEvent(started=ClientStarted(racer_instance_id="racer-2"))
        await aggregator.on_node_event(event(resume.reply_subject, resumed))
        rest = ClientEvent(delta=ClientDelta(text=" a time.", tokens=2))
        await aggregator.on_node_event(event(resume.reply_subject, rest))
        finished = ClientEvent(finished=ClientFinished(finish_reason="stop", usage=Usage()))
        await aggregator.on_node_event(event(resume.reply_subject, finished))

        to_client = [ClientEvent.FromString(p) for p in wire.on(start.reply_subject)]
        text = "".join(e.delta.text for e in to_client if e.WhichOneof("event") == "delta")
        assert text == "1. Once upon a time."
        assert to_client[-1].WhichOneof("event") == "finished"

    asyncio.run(scenario())
