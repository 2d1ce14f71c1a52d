"""A split request that outlives its aggregator, without transport: the record the aggregator
keeps of each request (the whole request's assignment), the client's `started` that names it,
the token counts its deltas carry, the record's end; the dispatcher's part (the assignment it
hands the aggregator) and a racer's takeover of such a record (fakes for NATS; the whole path
runs in tests/reliability/test_kills.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from llooma import subjects
from llooma.compress import compress
from llooma.membership import ServiceDirectory
from llooma.v1.common_pb2 import Usage
from llooma.v1.compress_pb2 import CompressReply
from llooma.v1.pipeline_pb2 import (
    ChatRequest,
    ClientDelta,
    ClientEvent,
    ClientFinished,
    ClientStarted,
    DagResume,
    DagResumed,
    HostCandidate,
    RaceResume,
    TaskAssignment,
)
from llooma.v1.plan_pb2 import AggregationReady, AggregationStart, NodeDone, Plan, PlanNode
from llooma.v1.race_pb2 import RaceRecord
from services.aggregator.handlers import Aggregator
from services.dispatcher.dag import PARENT_BUDGET_CHARS, DagRunner
from services.racer.records import take_over
from services.racer.takeover import RESUMED_TASK_SUFFIX


@dataclass
class Bucket:
    """A KV bucket's compare-and-set semantics, in memory."""

    values: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    revision: int = 0

    async def create(self, key: str, value: bytes) -> int:
        assert key not in self.values
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        if self.values.get(key, (b"", 0))[1] != last:
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    async def delete(self, key: str, last: int) -> bool:
        if self.values.get(key, (b"", 0))[1] != last:
            raise KeyWrongLastSequenceError
        del self.values[key]
        return True

    async def get(self, key: str) -> Any:
        if key not in self.values:
            raise NotFoundError
        value, revision = self.values[key]
        return SimpleNamespace(value=value, revision=revision)

    def _put(self, key: str, value: bytes) -> int:
        self.revision += 1
        self.values[key] = (value, self.revision)
        return self.revision


@dataclass
class Wire:
    sent: list[tuple[str, bytes]] = field(default_factory=list)

    async def publish(self, subject: str, payload: bytes, **_: Any) -> None:
        self.sent.append((subject, payload))

    def on(self, subject: str) -> list[ClientEvent]:
        return [ClientEvent.FromString(p) for to, p in self.sent if to == subject]


WHOLE = TaskAssignment(
    request=ChatRequest(request_id="r1", model="m"),
    task_id="t-whole",
    hosts=[HostCandidate(host_id="h1", model="m")],
)


def aggregation(resumable: bool) -> AggregationStart:
    return AggregationStart(
        request_id="r1",
        reply_subject="llooma.v1.reply.ingress-1.r1",
        nodes=[PlanNode(node_id="n1", label="1.", prompt="p", visible=True)],
        node_done_subject="llooma.v1.dag.d1.done",
        resume_assignment=WHOLE.SerializeToString() if resumable else b"",
    )


async def started(aggregator: Aggregator, start: AggregationStart) -> str:
    replies: list[bytes] = []

    async def respond(data: bytes) -> None:
        replies.append(data)

    await aggregator.on_start(
        cast(Any, SimpleNamespace(data=start.SerializeToString(), respond=respond))
    )
    prefix = AggregationReady.FromString(replies[0]).node_subject_prefix
    return subjects.aggregation_node(prefix, "n1")


async def node_event(aggregator: Aggregator, subject: str, event: ClientEvent) -> None:
    msg: Any = SimpleNamespace(subject=subject, data=event.SerializeToString())
    await aggregator.on_node_event(msg)


async def settle_background() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_recorded_request_names_its_aggregator_counts_tokens_and_ends_its_record() -> None:
    async def scenario() -> None:
        wire, bucket = Wire(), Bucket()
        aggregator = Aggregator(cast(Client, wire), "agg-1", races=cast(KeyValue, bucket))
        node = await started(aggregator, aggregation(resumable=True))
        await settle_background()
        value, _ = bucket.values["r1"]
        record = RaceRecord.FromString(value)
        assert record.racer_instance_id == "agg-1"
        assert record.assignment == WHOLE
        assert not record.attempts

        await node_event(
            aggregator, node, ClientEvent(started=ClientStarted(racer_instance_id="x"))
        )
        # The first line is held (a repeated heading?) with its tokens, then sent with them.
        for text, tokens in (("Once", 1), (" upon\n", 2), ("a time.", 3)):
            delta = ClientEvent(delta=ClientDelta(text=text, tokens=tokens))
            await node_event(aggregator, node, delta)
        to_client = wire.on("llooma.v1.reply.ingress-1.r1")
        assert to_client[0].started.racer_instance_id == "agg-1"
        deltas = [e.delta for e in to_client if e.WhichOneof("event") == "delta"]
        assert [d.tokens for d in deltas] == [3, 3]
        assert "".join(d.text for d in deltas) == "1. Once upon\na time."

        assert "r1" in bucket.values
        finished = ClientEvent(finished=ClientFinished(finish_reason="stop", usage=Usage()))
        await node_event(aggregator, node, finished)
        await settle_background()
        # Marked finished (an empty record), which names no one.
        assert bucket.values["r1"][0] == b""
        assert not aggregator.relaying()

    asyncio.run(scenario())


def test_a_record_taken_over_is_left_to_the_racer_that_holds_it() -> None:
    async def scenario() -> None:
        wire, bucket = Wire(), Bucket()
        aggregator = Aggregator(cast(Client, wire), "agg-1", races=cast(KeyValue, bucket))
        node = await started(aggregator, aggregation(resumable=True))
        await settle_background()
        _, revision = bucket.values["r1"]
        claim = RaceRecord(assignment=WHOLE, racer_instance_id="racer-2").SerializeToString()
        await bucket.update("r1", claim, last=revision)
        # This aggregator was only slow: it ends its request, the racer's claim stays.
        await node_event(aggregator, node, ClientEvent(delta=ClientDelta(text="Done.\n")))
        finished = ClientEvent(finished=ClientFinished(finish_reason="stop", usage=Usage()))
        await node_event(aggregator, node, finished)
        await settle_background()
        assert RaceRecord.FromString(bucket.values["r1"][0]).racer_instance_id == "racer-2"

    asyncio.run(scenario())


def test_an_unrecorded_request_names_no_aggregator() -> None:
    async def scenario() -> None:
        wire, bucket = Wire(), Bucket()
        aggregator = Aggregator(cast(Client, wire), "agg-1", races=cast(KeyValue, bucket))
        node = await started(aggregator, aggregation(resumable=False))
        await node_event(aggregator, node, ClientEvent(delta=ClientDelta(text="Hi.\n", tokens=1)))
        await settle_background()
        assert bucket.values == {}
        [first, _] = wire.on("llooma.v1.reply.ingress-1.r1")
        assert first.started.racer_instance_id == ""

    asyncio.run(scenario())


@dataclass
class RaceWire:
    cancelled: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)

    async def cancel(self, host_id: str, attempt_id: str) -> None:
        self.cancelled.append(attempt_id)

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        self.published.append(subject)


def test_a_racer_takes_over_a_dead_aggregators_request_and_settles_nothing_of_it() -> None:
    async def scenario() -> None:
        bucket, io = Bucket(), RaceWire()
        record = RaceRecord(assignment=WHOLE, racer_instance_id="agg-1")
        await bucket.create("r1", record.SerializeToString())
        resume = RaceResume(
            request_id="r1",
            reply_subject="llooma.v1.reply.ingress-1.r1-1",
            emitted="1. Once",
            delivered_tokens=2,
            racer_instance_id="agg-1",
        )
        taken = await take_over(cast(KeyValue, bucket), cast(Any, io), "racer-2", resume)
        assert not isinstance(taken, str), taken
        assignment, _ = taken
        await settle_background()
        assert assignment.task_id == "t-whole" + RESUMED_TASK_SUFFIX
        assert assignment.request.reply_subject == resume.reply_subject
        assert RaceRecord.FromString(bucket.values["r1"][0]).racer_instance_id == "racer-2"
        # The aggregator launched nothing: its node races are their own racers' to settle.
        assert (io.cancelled, io.published) == ([], [])

    asyncio.run(scenario())


def test_the_dispatcher_hands_the_aggregator_the_whole_requests_assignment() -> None:
    async def scenario() -> None:
        asked: list[AggregationStart] = []

        class Nats(Wire):
            async def request(self, subject: str, payload: bytes, **_: Any) -> Any:
                asked.append(AggregationStart.FromString(payload))
                ready = AggregationReady(node_subject_prefix="llooma.v1.agg.agg-1.r1")
                return SimpleNamespace(data=ready.SerializeToString())

        def assign(request: ChatRequest, avoid: set[str]) -> TaskAssignment:
            return TaskAssignment(request=request, task_id=f"t-{request.node_id or 'whole'}")

        nats = Nats()
        runner = DagRunner(cast(Client, nats), cast(JetStreamContext, nats), "d1", assign)
        nodes = [PlanNode(node_id="n1", label="1.", prompt="p", visible=True)]
        request = ChatRequest(request_id="r1", model="m", plan=Plan(nodes=nodes, decision="split"))
        await runner.start(request)
        [start] = asked
        whole = TaskAssignment.FromString(start.resume_assignment)
        assert whole.task_id == "t-whole"
        assert whole.request.request_id == "r1"
        assert whole.request.plan.decision == "split"
        # The nodes stay out of the record; the request's own plan keeps them.
        assert not whole.request.plan.nodes
        assert list(request.plan.nodes) == nodes

    asyncio.run(scenario())


def test_a_dag_whose_dispatcher_stopped_is_run_on_by_another_from_what_the_aggregator_heard() -> (
    None
):
    async def scenario() -> None:
        asked: list[DagResume] = []

        class Nats(Wire):
            async def request(self, subject: str, payload: bytes, **_: Any) -> Any:
                assert subject == subjects.DAG_RESUME
                asked.append(DagResume.FromString(payload))
                resumed = DagResumed(node_done_subject=subjects.node_done("d2"))
                return SimpleNamespace(data=resumed.SerializeToString())

        @dataclass
        class Dispatchers:
            stopped: set[str] = field(default_factory=set)

            def gone(self, instance_id: str, stale_after_s: float | None = None) -> bool:
                return instance_id in self.stopped

        wire, bucket, dispatchers = Nats(), Bucket(), Dispatchers()
        aggregator = Aggregator(
            cast(Client, wire),
            "agg-1",
            services=cast(ServiceDirectory, dispatchers),
            races=cast(KeyValue, bucket),
        )
        start = aggregation(resumable=True)
        start.node_done_subject = subjects.node_done("d1")
        start.nodes.extend(
            [
                PlanNode(node_id="n2", label="2.", prompt="q", visible=True),
                PlanNode(node_id="n3", label="3.", prompt="r", deps=["n1", "n2"], visible=True),
            ]
        )
        n1 = await started(aggregator, start)
        n2 = n1.removesuffix("n1") + "n2"
        await node_event(aggregator, n1, ClientEvent(started=ClientStarted(racer_instance_id="x")))
        await node_event(aggregator, n1, ClientEvent(delta=ClientDelta(text="One.\n")))
        finished = ClientEvent(finished=ClientFinished(finish_reason="stop", usage=Usage()))
        await node_event(aggregator, n1, finished)
        await node_event(aggregator, n2, ClientEvent(started=ClientStarted(racer_instance_id="y")))

        await aggregator.resume_stopped_dispatchers()
        assert asked == []  # d1 still beats
        dispatchers.stopped.add("d1")
        await aggregator.resume_stopped_dispatchers()
        [resume] = asked
        assert resume.request.request_id == "r1"
        assert [n.node_id for n in resume.request.plan.nodes] == ["n1", "n2", "n3"]
        assert resume.node_subject_prefix == n1.removesuffix(".n1")
        assert sorted(resume.released) == ["n1", "n2"]
        assert dict(resume.outputs) == {"n1": "One.\n"}

        # Finished parts are reported to the dispatcher that runs the DAG now.
        await node_event(aggregator, n2, ClientEvent(delta=ClientDelta(text="Two.\n")))
        await node_event(aggregator, n2, finished)
        [done] = [NodeDone.FromString(p) for to, p in wire.sent if to == subjects.node_done("d2")]
        assert (done.node_id, done.text) == ("n2", "Two.\n")
        # d2 beats: nothing asked again.
        await aggregator.resume_stopped_dispatchers()
        assert len(asked) == 1

    asyncio.run(scenario())


def test_a_resumed_dag_releases_only_the_parts_not_heard_of_once_their_parents_are_done() -> None:
    async def scenario() -> None:
        launched: list[str] = []

        def assign(request: ChatRequest, avoid: set[str]) -> TaskAssignment:
            launched.append(request.node_id)
            return TaskAssignment(request=request, task_id=f"t-{request.node_id}")

        class Nats(Wire):
            async def request(self, subject: str, payload: bytes, **_: Any) -> Any:
                return SimpleNamespace(data=CompressReply(text="short").SerializeToString())

        nats, replies = Nats(), list[bytes]()
        runner = DagRunner(cast(Client, nats), cast(JetStreamContext, nats), "d2", assign)
        nodes = [
            PlanNode(node_id="n1", label="1.", prompt="p", visible=True),
            PlanNode(node_id="n2", label="2.", prompt="q", visible=True),
            PlanNode(node_id="n3", label="3.", prompt="r", deps=["n1", "n2"], visible=True),
        ]
        resume = DagResume(
            request=ChatRequest(request_id="r1", plan=Plan(nodes=nodes)),
            node_subject_prefix="llooma.v1.agg.agg-1.r1",
            released=["n1", "n2"],
            outputs={"n1": "One."},
        )

        async def respond(data: bytes) -> None:
            replies.append(data)

        await runner.on_resume(
            cast(Any, SimpleNamespace(data=resume.SerializeToString(), respond=respond))
        )
        assert DagResumed.FromString(replies[0]).node_done_subject == runner.done_subject
        await settle_background()
        assert launched == []  # n3 waits for n2
        assert runner.running()
        done = NodeDone(request_id="r1", node_id="n2", text="Two.")
        await runner.on_node_done(cast(Any, SimpleNamespace(data=done.SerializeToString())))
        await settle_background()
        assert launched == ["n3"]
        [handed] = [
            TaskAssignment.FromString(p) for to, p in nats.sent if to == subjects.PIPELINE_RACER
        ]
        assert handed.request.reply_subject == "llooma.v1.agg.agg-1.r1.n3"
        assert "short" in handed.request.messages[-1].content
        runner.on_request_cancel("r1")
        assert not runner.running()

    asyncio.run(scenario())


def test_without_a_compressor_the_dispatcher_compresses_a_parts_parents_itself() -> None:
    async def scenario() -> None:
        class Nats(Wire):
            async def request(self, subject: str, payload: bytes, **_: Any) -> Any:
                assert subject == subjects.COMPRESS
                raise TimeoutError

        def assign(request: ChatRequest, avoid: set[str]) -> TaskAssignment:
            return TaskAssignment(request=request, task_id=f"t-{request.node_id}")

        nats = Nats()
        runner = DagRunner(cast(Client, nats), cast(JetStreamContext, nats), "d2", assign)
        nodes = [
            PlanNode(node_id="n1", label="1.", prompt="p", visible=True),
            PlanNode(node_id="n2", label="2.", prompt="q", deps=["n1"], visible=True),
        ]
        parent = "First sentence of the part. " * 200
        resume = DagResume(
            request=ChatRequest(request_id="r1", plan=Plan(nodes=nodes)),
            node_subject_prefix="llooma.v1.agg.agg-1.r1",
            released=["n1"],
            outputs={"n1": parent},
        )

        async def respond(data: bytes) -> None:
            pass

        await runner.on_resume(
            cast(Any, SimpleNamespace(data=resume.SerializeToString(), respond=respond))
        )
        await settle_background()
        [handed] = [
            TaskAssignment.FromString(p) for to, p in nats.sent if to == subjects.PIPELINE_RACER
        ]
        prompt = handed.request.messages[-1].content
        assert compress(parent, PARENT_BUDGET_CHARS) in prompt
        assert parent not in prompt

    asyncio.run(scenario())


def test_a_node_whose_racer_died_before_its_started_is_resumed_from_its_record() -> None:
    """No `started` reached the aggregator, so only the node's race record names its racer:
    learned at the next check, and resumed once that racer stops, from nothing received."""

    async def scenario() -> None:
        wire, bucket = Wire(), Bucket()
        stopped: set[str] = set()
        racers: Any = SimpleNamespace(gone=lambda instance, _s=None: instance in stopped)
        aggregator = Aggregator(
            cast(Client, wire),
            "agg-1",
            cast(JetStreamContext, wire),
            cast(ServiceDirectory, racers),
            races=cast(KeyValue, bucket),
        )
        await started(aggregator, aggregation(resumable=False))
        await aggregator.learn_racers()
        await aggregator.resume_stopped_racers()
        assert wire.on(subjects.PIPELINE_RESUME) == []  # no record yet: nothing to watch
        node_race = RaceRecord(assignment=WHOLE, racer_instance_id="racer-1")
        await bucket.create("r1.n1", node_race.SerializeToString())
        await aggregator.learn_racers()
        await aggregator.resume_stopped_racers()
        assert wire.on(subjects.PIPELINE_RESUME) == []  # racer-1 still beats
        stopped.add("racer-1")
        await aggregator.resume_stopped_racers()
        [asked] = [p for to, p in wire.sent if to == subjects.PIPELINE_RESUME]
        resume = RaceResume.FromString(asked)
        assert (resume.node_id, resume.racer_instance_id) == ("n1", "racer-1")
        assert (resume.emitted, resume.delivered_tokens) == ("", 0)

    asyncio.run(scenario())
