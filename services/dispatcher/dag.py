"""Runs a split request's DAG: a node is released when its parents are done, its prompt
carrying their outputs compressed; independent nodes race in parallel on different hosts. The
DAG of a dispatcher that died is run on from what its aggregator knows (`on_resume`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry.trace import Span

from llooma import bus, subjects, tracing
from llooma.compress import compress
from llooma.v1.common_pb2 import ERROR_CODE_NO_ELIGIBLE_HOST, ChatMessage, ErrorDetail
from llooma.v1.compress_pb2 import CompressReply, CompressRequest
from llooma.v1.pipeline_pb2 import (
    ChatRequest,
    ClientEvent,
    DagResume,
    DagResumed,
    TaskAssignment,
)
from llooma.v1.plan_pb2 import AggregationReady, AggregationStart, NodeDone, PlanNode

log = logging.getLogger(__name__)

# Characters of each parent's output injected into a dependant's prompt.
PARENT_BUDGET_CHARS = 2000
REQUEST_TIMEOUT_S = 2.0


@dataclass
class DagRun:
    request: ChatRequest
    node_prefix: str
    outputs: dict[str, str] = field(default_factory=dict)
    released: set[str] = field(default_factory=set)
    hosts_in_use: dict[str, set[str]] = field(default_factory=dict)
    # Nodes released later (on NodeDone) still hand off within the request's trace.
    span: Span | None = None


class DagRunner:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        instance_id: str,
        assign: Callable[[ChatRequest, set[str]], TaskAssignment | None],
    ) -> None:
        self._nc = nc
        self._js = js
        self._done_subject = subjects.node_done(instance_id)
        self._assign = assign
        self._runs: dict[str, DagRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def done_subject(self) -> str:
        return self._done_subject

    def running(self) -> bool:
        return bool(self._runs)

    async def start(self, request: ChatRequest) -> None:
        start = AggregationStart(
            request_id=request.request_id,
            reply_subject=request.reply_subject,
            model=request.model,
            nodes=request.plan.nodes,
            node_done_subject=self._done_subject,
        )
        resume_assignment = self._assign(request, set())
        if resume_assignment is not None:
            # Only what a racer needs to finish the whole answer if the aggregator dies.
            resume_assignment.request.plan.ClearField("nodes")
            start.resume_assignment = resume_assignment.SerializeToString()
        reply = await self._nc.request(
            subjects.AGGREGATE_START,
            start.SerializeToString(),
            timeout=REQUEST_TIMEOUT_S,
            headers=tracing.current_headers(),
        )
        prefix = AggregationReady.FromString(reply.data).node_subject_prefix
        run = DagRun(request, prefix, span=tracing.current_span())
        self._runs[request.request_id] = run
        await self._release(run)

    async def on_resume(self, msg: Msg) -> None:
        """Take over the DAG of a dispatcher that died: the parts its aggregator heard of
        stay as they are, the others are released as their parents finish. A part the dead
        dispatcher had handed off unheard is handed off again under the same `Nats-Msg-Id`,
        which JetStream drops."""
        resume = DagResume.FromString(msg.data)
        run = DagRun(
            resume.request,
            resume.node_subject_prefix,
            outputs=dict(resume.outputs),
            released=set(resume.released),
            span=tracing.current_span(),
        )
        self._runs[resume.request.request_id] = run
        await msg.respond(DagResumed(node_done_subject=self._done_subject).SerializeToString())
        await self._release(run)

    def on_request_cancel(self, request_id: str) -> None:
        """The request ended unfinished (its client left, or its aggregator died): release
        nothing more of it."""
        self._runs.pop(request_id, None)

    async def on_node_done(self, msg: Msg) -> None:
        done = NodeDone.FromString(msg.data)
        run = self._runs.get(done.request_id)
        if run is None:
            return
        run.hosts_in_use.pop(done.node_id, None)
        if done.failed:
            self._runs.pop(done.request_id, None)
            return
        run.outputs[done.node_id] = done.text
        if len(run.outputs) == len(run.request.plan.nodes):
            self._runs.pop(done.request_id, None)
        else:
            await self._release(run)

    async def _release(self, run: DagRun) -> None:
        for node in run.request.plan.nodes:
            if node.node_id in run.released:
                continue
            if all(dep in run.outputs for dep in node.deps):
                run.released.add(node.node_id)
                task = asyncio.create_task(self._launch(run, node))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _compress(self, text: str) -> str:
        request = CompressRequest(text=text, budget=PARENT_BUDGET_CHARS)
        try:
            reply = await self._nc.request(
                subjects.COMPRESS,
                request.SerializeToString(),
                timeout=REQUEST_TIMEOUT_S,
                headers=tracing.current_headers(),
            )
        except Exception as error:
            # The compressor is a pure function (llooma.compress): when none answers (it died
            # with the call, or none runs), the same text is compressed here.
            log.warning("no compressor answered (%r): compressing here", error)
            return compress(text, PARENT_BUDGET_CHARS)
        return CompressReply.FromString(reply.data).text

    async def _launch(self, run: DagRun, node: PlanNode) -> None:
        with tracing.within(run.span):
            await self._launch_node(run, node)

    async def _launch_node(self, run: DagRun, node: PlanNode) -> None:
        try:
            prompt = node.prompt
            if node.deps:
                by_id = {n.node_id: n for n in run.request.plan.nodes}
                context = []
                for dep in node.deps:
                    name = by_id[dep].label or dep
                    context.append(f"[{name}]\n{await self._compress(run.outputs[dep])}")
                prompt = f"{prompt}\n\nResults of the earlier steps:\n\n" + "\n\n".join(context)
            node_request = ChatRequest()
            node_request.CopyFrom(run.request)
            node_request.ClearField("plan")
            node_request.node_id = node.node_id
            if run.request.params.max_tokens:
                # The client's budget is for the whole answer: each part gets its share.
                parts = len(run.request.plan.nodes)
                node_request.params.max_tokens = max(16, run.request.params.max_tokens // parts)
            node_request.reply_subject = subjects.aggregation_node(run.node_prefix, node.node_id)
            system = [m for m in run.request.messages if m.role in ("system", "developer")]
            node_request.ClearField("messages")
            node_request.messages.extend([*system, ChatMessage(role="user", content=prompt)])
            avoid: set[str] = set().union(*run.hosts_in_use.values())
            assignment = self._assign(node_request, avoid)
            if assignment is None:
                failure = ErrorDetail(
                    code=ERROR_CODE_NO_ELIGIBLE_HOST, message="no eligible host for a part"
                )
                await self._nc.publish(
                    node_request.reply_subject, ClientEvent(failed=failure).SerializeToString()
                )
                return
            run.hosts_in_use[node.node_id] = {h.host_id for h in assignment.hosts}
            await bus.hand_off(
                self._js,
                subjects.PIPELINE_RACER,
                assignment.SerializeToString(),
                f"{run.request.request_id}.{node.node_id}.racer",
            )
        except Exception:
            log.exception("node %s of %s not launched", node.node_id, run.request.request_id)
            failure = ErrorDetail(
                code=ERROR_CODE_NO_ELIGIBLE_HOST, message="a part failed to start"
            )
            await self._nc.publish(
                subjects.aggregation_node(run.node_prefix, node.node_id),
                ClientEvent(failed=failure).SerializeToString(),
            )
