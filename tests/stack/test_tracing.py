"""Tracing: W3C traceparent through NATS headers, and one connected trace per request.

The unit tests export into an InMemorySpanExporter in this process; the stack test runs its
own stack (own NATS, so no other stack's services take its messages) exporting over OTLP/HTTP
to an in-process receiver, and checks the trace the separate service processes produced.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, get_current_span
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from llooma import subjects, tracing
from llooma.processes import free_port
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack
from tests.support.ledger_db import new_database
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, exporting_to

TRACEPARENT_FORMAT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# A short prompt takes the fast path: privacy runs the planner's stage 1 and hands the request
# straight to the dispatcher (the planner still follows its race event, as every race's).
PIPELINE_SERVICES = {"ingress", "privacy", "dispatcher", "racer", "host", "accounting"}


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("unit", exporter=exporter)
    yield exporter
    tracing.shutdown()


def message(subject: str, headers: dict[str, str] | None) -> Msg:
    return Msg(None, subject=subject, data=b"", headers=headers)  # type: ignore[arg-type]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, None),
    ],
)
def test_exporter_comes_from_the_standard_variables(
    environ: dict[str, str], expected: str | None
) -> None:
    assert tracing.configured_exporter(environ) == expected


async def test_untraced_process_adds_no_header_and_no_layer() -> None:
    assert not tracing.enabled()
    headers = {"Nats-Msg-Id": "x"}
    assert tracing.inject(headers) == {"Nats-Msg-Id": "x"}
    assert tracing.current_headers() is None
    assert tracing.start_span("nothing") is None
    assert not tracing.carries_trace({"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"})

    async def handler(msg: Msg) -> None:
        pass

    assert tracing.traced("llooma.v1.x", handler) is handler


# -- propagation -----------------------------------------------------------------------------


async def test_inject_then_extract_continues_the_trace(exported: InMemorySpanExporter) -> None:
    parent = tracing.start_span("parent")
    assert parent is not None
    headers = tracing.inject({"Nats-Msg-Id": "abc"}, parent)
    match = TRACEPARENT_FORMAT.match(headers["traceparent"])
    assert match is not None, headers
    context = parent.get_span_context()
    assert match.group(1) == f"{context.trace_id:032x}"
    assert match.group(2) == f"{context.span_id:016x}"
    assert int(match.group(3), 16) & 1, "not marked sampled"
    assert tracing.carries_trace(headers)
    assert not tracing.carries_trace({"Nats-Msg-Id": "abc"})
    child = tracing.start_span("child", headers=headers)
    tracing.end_span(child)
    tracing.end_span(parent)
    finished = {s.name: s for s in exported.get_finished_spans()}
    assert finished["child"].context.trace_id == context.trace_id
    assert parent_of(finished["child"]) == context.span_id


async def test_traced_handler_runs_in_a_consumer_span_whose_hand_offs_carry_it(
    exported: InMemorySpanExporter,
) -> None:
    origin = tracing.start_span("origin")
    seen: list[dict[str, str] | None] = []

    async def handler(msg: Msg) -> None:
        seen.append(tracing.current_headers())

    traced = tracing.traced("llooma.v1.pipeline.planner", handler)
    await traced(message("llooma.v1.pipeline.planner", tracing.headers_for(origin)))
    await traced(message("llooma.v1.pipeline.planner", None))
    tracing.end_span(origin)
    spans = {s.name: s for s in exported.get_finished_spans()}
    consumer = spans["process llooma.v1.pipeline.planner"]
    assert origin is not None
    assert consumer.kind == SpanKind.CONSUMER
    assert parent_of(consumer) == origin.get_span_context().span_id
    # The message without a traceparent ran untraced: no span, nothing to pass on.
    assert len(exported.get_finished_spans()) == 2
    assert seen[1] == {}
    assert consumer.context is not None
    assert seen[0] is not None
    assert seen[0]["traceparent"].split("-")[2] == f"{consumer.context.span_id:016x}"


async def test_handler_failure_marks_the_span_without_its_message(
    exported: InMemorySpanExporter,
) -> None:
    origin = tracing.start_span("origin")

    async def handler(msg: Msg) -> None:
        raise ValueError("secret prompt text")

    traced = tracing.traced("llooma.v1.pipeline.privacy", handler)
    with pytest.raises(ValueError, match="secret"):
        await traced(message("llooma.v1.pipeline.privacy", tracing.headers_for(origin)))
    tracing.end_span(origin)
    consumer = next(s for s in exported.get_finished_spans() if s.name.startswith("process"))
    assert consumer.status.description == "ValueError"
    assert not consumer.events


async def test_each_message_of_a_batch_gets_a_span_in_its_own_trace(
    exported: InMemorySpanExporter,
) -> None:
    first, second = tracing.start_span("first"), tracing.start_span("second")
    assert first is not None
    assert second is not None
    batch = [
        message("llooma.v1.settlement.task", tracing.headers_for(first)),
        message("llooma.v1.settlement.task", tracing.headers_for(second)),
        message("llooma.v1.settlement.task", {"Nats-Msg-Id": "untraced"}),
    ]
    with tracing.batch_spans("llooma.v1.settlement.task", batch):
        pass
    settled = [s for s in exported.get_finished_spans() if s.kind == SpanKind.CONSUMER]
    assert sorted((s.context.trace_id, parent_of(s)) for s in settled if s.context) == sorted(
        (p.get_span_context().trace_id, p.get_span_context().span_id) for p in (first, second)
    )


async def test_http_server_span_continues_the_callers_trace(
    exported: InMemorySpanExporter,
) -> None:
    handed_off: list[dict[str, str] | None] = []

    async def chat(request: Request) -> StreamingResponse:
        tracing.annotate_chat("req-1", "echo")
        handed_off.append(tracing.current_headers())

        async def body() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"

        return StreamingResponse(body())

    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/healthz", health)],
        middleware=[Middleware(tracing.ServerSpans)],
    )
    caller_trace, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(
            "/v1/chat/completions", headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"}
        )
        assert response.status_code == 200
        assert (await client.get("/healthz")).status_code == 200
    spans = exported.get_finished_spans()
    assert [s.name for s in spans] == ["POST /v1/chat/completions"]
    server = spans[0]
    assert server.kind == SpanKind.SERVER
    assert server.context is not None
    assert f"{server.context.trace_id:032x}" == caller_trace
    assert server.parent is not None
    assert f"{server.parent.span_id:016x}" == caller_span
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["gen_ai.request.model"] == "echo"
    assert handed_off[0] is not None
    assert handed_off[0]["traceparent"].split("-")[2] == f"{server.context.span_id:016x}"
    assert not get_current_span().is_recording()


# -- the stack ---------------------------------------------------------------------------------


@pytest.fixture
def traced_stack(receiver: OtlpReceiver, database_url: str, tmp_path: Path) -> Iterator[Stack]:
    # Its own NATS server: on the shared one, the session stack's untraced services would
    # take turns with these in every consumer group.
    running = Stack(
        root=tmp_path / "stack",
        http_port=free_port(),
        database_url=new_database(database_url, "tracing"),
        extra_env={
            **exporting_to(receiver),
        },
    )
    running.start()
    yield running
    running.stop()


def request_trace(spans: list[ReceivedSpan], request_id: str) -> list[ReceivedSpan]:
    roots = {s.trace_id for s in spans if s.attributes.get("llooma.request_id") == request_id}
    return [s for s in spans if s.trace_id in roots]


def settled(trace: list[ReceivedSpan]) -> bool:
    """Every attempt's settlement arrived, and every span's parent with it."""
    attempts = [s for s in trace if s.service == "racer" and s.kind == "CLIENT"]
    ledger = [s for s in trace if s.service == "accounting"]
    ids = {s.span_id for s in trace}
    return (
        bool(attempts)
        and len(ledger) >= len(attempts)
        and all(not s.parent_span_id or s.parent_span_id in ids for s in trace)
        and {s.service for s in trace} >= PIPELINE_SERVICES
    )


@pytest.mark.timeout(240)
def test_one_request_is_one_connected_trace_across_every_service(
    traced_stack: Stack, receiver: OtlpReceiver
) -> None:
    canary = f"zebracanary{uuid.uuid4().hex[:8]}"
    prompt = f"Please repeat the word {canary} back to me, and nothing else at all."
    with httpx.Client(base_url=traced_stack.base_url, timeout=30.0) as client:
        response = client.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {DEV_API_KEY}"},
            json={"model": "echo", "messages": [{"role": "user", "content": prompt}]},
        )
    assert response.status_code == 200, response.text
    answer = response.json()["choices"][0]["message"]["content"]
    assert canary in answer
    request_id = response.headers["x-llooma-request-id"]

    spans = receiver.wait_for(lambda got: settled(request_trace(got, request_id)), 30.0)
    trace = request_trace(spans, request_id)
    assert len({s.trace_id for s in trace}) == 1, "the request's spans form several traces"
    by_id = {s.span_id: s for s in trace}
    orphans = [s.name for s in trace if s.parent_span_id and s.parent_span_id not in by_id]
    assert not orphans, f"spans whose parent never arrived: {orphans}"
    roots = [s for s in trace if not s.parent_span_id]
    assert [(r.service, r.name) for r in roots] == [("ingress", "POST /v1/chat/completions")]
    services = {s.service for s in trace}
    assert services >= PIPELINE_SERVICES, f"missing: {PIPELINE_SERVICES - services}"
    handed_to_planner = [s.name for s in trace if subjects.PIPELINE_PLANNER in s.name]
    assert not handed_to_planner, "a bypassed request went through the planner's process"

    # The host's span sits under the racer's attempt, and a settlement under each attempt.
    attempts = {s.span_id: s for s in trace if s.service == "racer" and s.name == "chat echo"}
    host_spans = [s for s in trace if s.service == "host"]
    assert host_spans
    assert all(s.parent_span_id in attempts for s in host_spans)
    ledger = [s for s in trace if s.service == "accounting"]
    assert sorted(s.parent_span_id for s in ledger) == sorted(attempts)

    race = next(s for s in trace if s.name == "race echo")
    assert race.attributes["gen_ai.operation.name"] == "chat"
    assert race.attributes["gen_ai.request.model"] == "echo"
    assert race.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    served = next(s for s in host_spans if "gen_ai.usage.output_tokens" in s.attributes)
    assert served.attributes["gen_ai.usage.input_tokens"] == len(prompt.split())
    assert (
        served.attributes["gen_ai.usage.output_tokens"]
        == race.attributes["gen_ai.usage.output_tokens"]
    )

    # Neither the prompt nor the answer is anywhere on any span of any service.
    for span in spans:
        for text in span.texts():
            assert canary not in text, f"{span.service}/{span.name} carries the prompt"
            assert answer not in text, f"{span.service}/{span.name} carries the answer"
