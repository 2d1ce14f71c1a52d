"""Aggregator: merges a split request's node outputs into one answer, in the order the user
asked, and streams it: the first part in order goes out live, later parts as their turn comes.
A node whose racer stops beating is resumed on another racer from what the aggregator received
of it, as an ingress resumes a direct answer (docs/RELIABILITY.md, "A racer's death"). The
aggregator records each request it relays (the whole request's assignment, key = request id)
and names itself in the client's `started`: if it dies, the ingress has a racer finish the
answer from what the client received, as for a dead racer. When the dispatcher running the
request's DAG stops beating with parts not yet released, it has another dispatcher run the
rest of the DAG from what it heard of each part.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from llooma import bus, subjects
from llooma.answer_text import clean
from llooma.compress import strip_control_tokens
from llooma.membership import RACER_MISSED_BEATS, ServiceDirectory
from llooma.planning import SPLIT_DECISION
from llooma.race_records import RecordWriter, race_key, racer_of
from llooma.v1.common_pb2 import ERROR_CODE_HOST_FAILED, REQUEST_PATH_SPLIT, ErrorDetail, Usage
from llooma.v1.pipeline_pb2 import (
    ChatRequest,
    ClientDelta,
    ClientEvent,
    ClientFinished,
    ClientStarted,
    DagResume,
    DagResumed,
    RaceResume,
    TaskAssignment,
)
from llooma.v1.plan_pb2 import AggregationReady, AggregationStart, NodeDone, PlanNode
from llooma.v1.race_pb2 import RaceRecord

log = logging.getLogger(__name__)

_HEADING_MARKS = re.compile(r"^[\s#*_>\-]+|[\s*_:]+$")
# Hold a part's first line this long at most while checking it for a repeated heading.
HEADING_HOLD_CHARS = 160
DAG_RESUME_TIMEOUT_S = 2.0


def heading_key(text: str) -> str:
    return _HEADING_MARKS.sub("", text).strip().lower()


@dataclass
class Part:
    node: PlanNode
    # Arrived but not yet sent to the client.
    text: list[str] = field(default_factory=list)
    # Everything the node produced: what its dependants get.
    output: list[str] = field(default_factory=list)
    finished: bool = False
    # Nothing of this part has reached the client yet.
    unsent: bool = True
    heading_checked: bool = False
    # The racer relaying the node's answer ("" until its `started`), the token chunks it
    # relayed, and how many times the node was resumed (its reply subject's generation).
    racer: str = ""
    tokens: int = 0
    generation: int = 0
    # Token chunks of `text` (what has not moved to the client's pending output yet).
    held_tokens: int = 0


@dataclass
class Aggregation:
    start: AggregationStart
    parts: dict[str, Part]
    order: list[str]
    position: int = 0
    started: bool = False
    usage: Usage = field(default_factory=Usage)
    pending: list[str] = field(default_factory=list)
    pending_tokens: int = 0
    # The request's record (its last revision is this aggregator's claim): None if the
    # request cannot be resumed elsewhere.
    record: RecordWriter | None = None
    # The whole request, plan nodes included (with a record): what another dispatcher runs
    # the DAG on from, if the one running it dies.
    request: ChatRequest | None = None

    def unreleased(self) -> bool:
        """A part not heard of yet: its dispatcher may still have to release it."""
        return any(not p.finished and not p.racer and not p.generation for p in self.parts.values())


class Aggregator:
    def __init__(
        self,
        nc: Client,
        instance_id: str,
        js: JetStreamContext | None = None,
        services: ServiceDirectory | None = None,
        heartbeat_interval_s: float = 1.0,
        races: KeyValue | None = None,
    ) -> None:
        self._nc = nc
        self._instance_id = instance_id
        self._runs: dict[str, Aggregation] = {}
        # With both, a node whose racer stopped is resumed on another racer.
        self._js = js
        self._services = services
        self._racer_silent_s = RACER_MISSED_BEATS * heartbeat_interval_s
        # With it, each request is recorded, so a racer can finish it if this process dies.
        self._races = races
        self._releasing: set[asyncio.Task[None]] = set()

    def relaying(self) -> bool:
        return bool(self._runs)

    async def on_start(self, msg: Msg) -> None:
        start = AggregationStart.FromString(msg.data)
        parts = {n.node_id: Part(n) for n in start.nodes}
        order = [n.node_id for n in start.nodes if n.visible]
        run = self._runs[start.request_id] = Aggregation(start, parts, order)
        if self._races is not None and start.resume_assignment:
            # Written in the background: the record is there long before the client's
            # `started`, which is what makes the ingress watch this process.
            run.record = RecordWriter(self._races, start.request_id)
            assignment = TaskAssignment.FromString(start.resume_assignment)
            run.record.write(RaceRecord(assignment=assignment, racer_instance_id=self._instance_id))
            run.request = ChatRequest()
            run.request.CopyFrom(assignment.request)
            run.request.plan.nodes.extend(start.nodes)
        prefix = subjects.aggregation_nodes(self._instance_id, start.request_id)
        await msg.respond(AggregationReady(node_subject_prefix=prefix).SerializeToString())

    async def on_node_event(self, msg: Msg) -> None:
        request_id, node_id, generation = subjects.aggregation_node_ids(msg.subject)
        run = self._runs.get(request_id)
        if run is None or node_id not in run.parts:
            return
        part = run.parts[node_id]
        if generation != part.generation:
            # A racer taken for dead that was only slow: its node was resumed elsewhere.
            return
        event = ClientEvent.FromString(msg.data)
        kind = event.WhichOneof("event")
        if kind == "started":
            part.racer = event.started.racer_instance_id
        elif kind == "delta":
            part.tokens += event.delta.tokens
            part.held_tokens += event.delta.tokens
            part.text.append(event.delta.text)
            part.output.append(event.delta.text)
            await self._advance(run)
        elif kind == "finished":
            part.finished = True
            run.usage.input_tokens += event.finished.usage.input_tokens
            run.usage.output_tokens += event.finished.usage.output_tokens
            await self._report(run, part, None)
            await self._advance(run)
        elif kind == "failed":
            await self._report(run, part, event.failed)
            await self._send(run, ClientEvent(failed=event.failed))
            self._end(run)

    async def learn_racers(self) -> None:
        """Each unfinished node not heard of yet: its racer, from its race's record once there
        is one, so a racer that dies before the node's `started` reaches this process is
        missed like any other (called every `RACER_CHECK_S`)."""
        if self._races is None:
            return
        for run in list(self._runs.values()):
            for part in run.parts.values():
                if not (part.finished or part.racer or part.generation):
                    key = race_key(run.start.request_id, part.node.node_id)
                    part.racer = await racer_of(self._races, key)

    async def resume_stopped_racers(self) -> None:
        """Resume every unfinished node whose racer has stopped beating (called every
        `RACER_CHECK_S`)."""
        if self._services is None or self._js is None:
            return
        for run in list(self._runs.values()):
            stopped = [
                part
                for part in run.parts.values()
                if not part.finished
                and part.racer
                and self._services.gone(part.racer, self._racer_silent_s)
            ]
            for part in stopped:
                if not await self._resume(run, part):
                    break

    async def resume_stopped_dispatchers(self) -> None:
        """Have a live dispatcher run on each DAG whose dispatcher stopped beating while parts
        are still to be released (called every `RACER_CHECK_S`; a request no dispatcher took
        is asked again at the next check)."""
        if self._services is None:
            return
        for run in list(self._runs.values()):
            if run.request is None or not run.unreleased():
                continue
            dispatcher = subjects.node_done_dispatcher(run.start.node_done_subject)
            if not self._services.gone(dispatcher, self._racer_silent_s):
                continue
            log.warning(
                "dispatcher %s stopped running the DAG of %s: resuming",
                dispatcher,
                run.start.request_id,
            )
            resume = DagResume(
                request=run.request,
                node_subject_prefix=subjects.aggregation_nodes(
                    self._instance_id, run.start.request_id
                ),
                released=[
                    node_id
                    for node_id, p in run.parts.items()
                    if p.finished or p.racer or p.generation
                ],
                outputs={
                    node_id: strip_control_tokens("".join(p.output))
                    for node_id, p in run.parts.items()
                    if p.finished
                },
            )
            try:
                reply = await self._nc.request(
                    subjects.DAG_RESUME, resume.SerializeToString(), timeout=DAG_RESUME_TIMEOUT_S
                )
            except Exception as error:
                log.warning("DAG of %s not resumed: %r", run.start.request_id, error)
                continue
            run.start.node_done_subject = DagResumed.FromString(reply.data).node_done_subject

    async def _resume(self, run: Aggregation, part: Part) -> bool:
        """Hand the node to another racer, which claims the dead race's record, settles it,
        and finishes the node's answer from what this aggregator received; False if the
        request failed instead."""
        assert self._js is not None
        request_id, node_id = run.start.request_id, part.node.node_id
        log.warning(
            "racer %s stopped running node %s of %s: resuming", part.racer, node_id, request_id
        )
        stopped, part.racer = part.racer, ""
        part.generation += 1
        resume = RaceResume(
            request_id=request_id,
            node_id=node_id,
            reply_subject=subjects.aggregation_node_resumed(
                self._instance_id, request_id, node_id, part.generation
            ),
            emitted="".join(part.output),
            delivered_tokens=part.tokens,
            racer_instance_id=stopped,
        )
        try:
            await bus.hand_off(
                self._js, subjects.PIPELINE_RESUME, resume.SerializeToString(), resume.reply_subject
            )
        except Exception as error:
            failure = ErrorDetail(
                code=ERROR_CODE_HOST_FAILED, message=f"a part's racer stopped ({error!r})"
            )
            await self._report(run, part, failure)
            await self._send(run, ClientEvent(failed=failure))
            self._end(run)
            return False
        return True

    async def _report(self, run: Aggregation, part: Part, error: ErrorDetail | None) -> None:
        done = NodeDone(
            request_id=run.start.request_id,
            node_id=part.node.node_id,
            # Model-bound (a later node's prompt): the compressor's wider rule.
            text=strip_control_tokens("".join(part.output)),
            failed=error is not None,
            error=error,
        )
        await self._nc.publish(run.start.node_done_subject, done.SerializeToString())

    async def _advance(self, run: Aggregation) -> None:
        """Send what the current part has, and move on while parts are finished."""
        while run.position < len(run.order):
            part = run.parts[run.order[run.position]]
            if not self._emit_ready(run, part):
                break
            if not part.finished:
                break
            run.position += 1
        await self._flush(run)
        if run.position == len(run.order) and all(p.finished for p in run.parts.values()):
            finished = ClientFinished(finish_reason="stop", usage=run.usage)
            await self._send(run, ClientEvent(finished=finished))
            self._end(run)

    def _end(self, run: Aggregation) -> None:
        """Forget the request and delete its record (if still this aggregator's: a racer that
        took it over holds it now), in the background."""
        self._runs.pop(run.start.request_id, None)
        if run.record is not None:
            release = asyncio.create_task(self._release(run.record))
            bus.keep_task(self._releasing, release, "deleting an aggregation's record")

    @staticmethod
    async def _release(record: RecordWriter) -> None:
        await record.release()

    def _emit_ready(self, run: Aggregation, part: Part) -> bool:
        """Move the part's text to the pending output; False while its first line is held."""
        # Client-bound: the one answer-text policy (each node's race already applied it).
        text = clean("".join(part.text))
        if not part.heading_checked:
            if "\n" not in text and len(text) < HEADING_HOLD_CHARS and not part.finished:
                return False
            part.heading_checked = True
            first, newline, rest = text.partition("\n")
            label = part.node.label
            # The model repeated the user's item as its own heading: the label says it once.
            if (
                newline
                and label
                and heading_key(first)
                in (
                    heading_key(label),
                    heading_key(part.node.prompt.split("\n\n")[-1]),
                )
            ):
                text = rest
        part.text = []
        run.pending_tokens += part.held_tokens
        part.held_tokens = 0
        if part.unsent and (text or part.finished):
            part.unsent = False
            separator = "\n\n" if run.started or run.pending else ""
            header = f"{part.node.label} " if part.node.label else ""
            text = separator + header + text.lstrip("\n")
        if text:
            run.pending.append(text)
        return True

    async def _flush(self, run: Aggregation) -> None:
        if not run.pending:
            return
        if not run.started:
            run.started = True
            started = ClientStarted(
                path=REQUEST_PATH_SPLIT,
                model=run.start.model,
                plan_decision=SPLIT_DECISION,
                racer_instance_id=self._instance_id if run.record is not None else "",
            )
            await self._send(run, ClientEvent(started=started))
        text = "".join(run.pending)
        run.pending.clear()
        tokens, run.pending_tokens = run.pending_tokens, 0
        await self._send(run, ClientEvent(delta=ClientDelta(text=text, tokens=tokens)))

    async def _send(self, run: Aggregation, event: ClientEvent) -> None:
        await self._nc.publish(run.start.reply_subject, event.SerializeToString())
