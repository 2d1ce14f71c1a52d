"""OpenTelemetry tracing across every hop: W3C `traceparent` travels in NATS headers.

`setup` reads the standard OTEL_* variables. Only when an exporter is configured
(`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_TRACES_EXPORTER`
naming `otlp` or `console`) does it build a tracer provider; otherwise every helper here returns
at its first branch: no span is created and no header is added, so an untraced stack pays one
comparison per hop. Spans carry ids, model names, token counts and outcomes, never prompt or
answer text (nor free-form error messages, which may quote either).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACER_NAME = "llooma"
# HTTP paths polled by probes: a span each would bury the requests in noise.
UNTRACED_PATHS = frozenset({"/healthz"})

MsgHandler = Callable[[Msg], Awaitable[None]]

_propagator = TraceContextTextMapPropagator()
_tracer: Tracer | None = None
_provider: TracerProvider | None = None


# -- set-up ----------------------------------------------------------------------------------


def configured_exporter(environ: Mapping[str, str] = os.environ) -> str | None:
    """`otlp`, `console` or None (tracing off), from the standard OTEL_* variables."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = {n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")}
    named.discard("")
    if named:
        for kind in ("otlp", "console"):
            if kind in named:
                return kind
        return None
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return "otlp" if any(environ.get(name) for name in endpoints) else None


def setup(
    service_name: str, *, instance_id: str = "", exporter: SpanExporter | None = None
) -> bool:
    """Trace this process as `service_name` (OTEL_SERVICE_NAME overrides it) if an exporter is
    configured, or into `exporter` (tests: exported synchronously); returns whether it traces."""
    global _tracer, _provider
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    processor: SpanProcessor
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    else:
        kind = configured_exporter()
        if kind is None:
            return False
        processor = BatchSpanProcessor(_exporter(kind))
    attributes: dict[str, AttributeValue] = {
        SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name
    }
    if instance_id:
        attributes[SERVICE_INSTANCE_ID] = instance_id
    shutdown()
    # A real exporter is flushed when the process exits; a test's is shut down by the test.
    provider = TracerProvider(
        resource=Resource.create(attributes), shutdown_on_exit=exporter is None
    )
    provider.add_span_processor(processor)
    _provider = provider
    _tracer = provider.get_tracer(TRACER_NAME)
    return True


def _exporter(kind: str) -> SpanExporter:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        log.warning("OTLP protocol %s is not available here; exporting http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def shutdown() -> None:
    """Flush and stop tracing; every helper is a no-op again afterwards."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


# -- propagation -----------------------------------------------------------------------------


def inject(headers: dict[str, str], span: Span | None = None) -> dict[str, str]:
    """Add `span`'s (default: the current span's) traceparent to NATS headers, when tracing."""
    if _tracer is not None:
        _propagator.inject(headers, None if span is None else trace.set_span_in_context(span))
    return headers


def headers_for(span: Span | None) -> dict[str, str] | None:
    """NATS headers carrying `span`'s traceparent, or None (no headers at all) without a span."""
    if span is None:
        return None
    return inject({}, span)


def current_span() -> Span | None:
    """The current span, to make current again later (`within`); None when not tracing."""
    return None if _tracer is None else trace.get_current_span()


def current_headers() -> dict[str, str] | None:
    """NATS headers carrying the current span's traceparent, or None when not tracing."""
    return None if _tracer is None else inject({})


def carries_trace(headers: Mapping[str, str] | None) -> bool:
    """Whether a message continues a trace (and tracing is on): what gets a span."""
    return _tracer is not None and headers is not None and TRACEPARENT in headers


def extract(headers: Mapping[str, str] | None) -> Context:
    """The remote parent carried by NATS or HTTP headers (an empty context without one)."""
    return _propagator.extract(headers or {})


# -- spans -----------------------------------------------------------------------------------


def start_span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Span | None = None,
    headers: Mapping[str, str] | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Span | None:
    """A span under `parent`, else under the traceparent in `headers`, else under the current
    span; None when not tracing. The caller ends it (`end_span`)."""
    if _tracer is None:
        return None
    if parent is not None:
        context: Context | None = trace.set_span_in_context(parent)
    elif headers is not None:
        context = extract(headers)
    else:
        context = None
    return _tracer.start_span(name, context=context, kind=kind, attributes=attributes)


def end_span(span: Span | None, *, error: str = "") -> None:
    """End `span`; `error` is a code or type name, never a message (it may quote text)."""
    if span is None:
        return
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def within(span: Span | None) -> contextlib.AbstractContextManager[object]:
    """Make `span` current (so hand-offs inside carry it) without ending it."""
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(span, record_exception=False, set_status_on_exception=False)


def traced(subject: str, handler: MsgHandler) -> MsgHandler:
    """`handler` with a CONSUMER span per message that carries a traceparent; `handler` itself
    when not tracing, so an untraced subscription pays nothing per message."""
    tracer = _tracer
    if tracer is None:
        return handler
    name = f"process {subject}"
    attributes: dict[str, AttributeValue] = {
        "messaging.system": "nats",
        "messaging.operation.name": "process",
        "messaging.destination.name": subject,
    }

    async def run(msg: Msg) -> None:
        headers = msg.headers
        if not headers or TRACEPARENT not in headers:
            await handler(msg)
            return
        with tracer.start_as_current_span(
            name,
            context=extract(headers),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await handler(msg)
            except Exception as error:
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                raise

    return run


@contextlib.contextmanager
def consumer_span(subject: str, headers: Mapping[str, str] | None) -> Iterator[Span | None]:
    """A current CONSUMER span for one message (for handlers not run through `traced`)."""
    if _tracer is None or not headers or TRACEPARENT not in headers:
        yield None
        return
    with _tracer.start_as_current_span(
        f"process {subject}",
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "nats", "messaging.destination.name": subject},
    ) as span:
        yield span


@contextlib.contextmanager
def batch_spans(subject: str, messages: Iterable[Msg]) -> Iterator[None]:
    """One CONSUMER span per traced message of a batch, each in its sender's trace and spanning
    the batch's processing (which settles them all at once)."""
    tracer = _tracer
    if tracer is None:
        yield
        return
    traced_messages = [m for m in messages if m.headers and TRACEPARENT in m.headers]
    attributes: dict[str, AttributeValue] = {
        "messaging.system": "nats",
        "messaging.operation.name": "process",
        "messaging.destination.name": subject,
        "messaging.batch.message_count": len(traced_messages),
    }
    spans = [
        tracer.start_span(
            f"process {subject}",
            context=extract(m.headers),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        for m in traced_messages
    ]
    try:
        yield
    except Exception as error:
        for span in spans:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        raise
    finally:
        for span in spans:
            span.end()


# -- GenAI semantic conventions ----------------------------------------------------------------


def chat_attributes(model: str) -> dict[str, AttributeValue]:
    return {"gen_ai.operation.name": "chat", "gen_ai.request.model": model}


def record_usage(
    span: Span | None, input_tokens: int, output_tokens: int, finish_reason: str = ""
) -> None:
    if span is None:
        return
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
    if finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])


def annotate_chat(request_id: str, model: str) -> None:
    """Name the request and its model on the current span (the ingress's server span)."""
    if _tracer is None:
        return
    span = trace.get_current_span()
    span.set_attributes({"llooma.request_id": request_id, **chat_attributes(model)})


# -- HTTP --------------------------------------------------------------------------------------


class ServerSpans:
    """ASGI middleware: one SERVER span per HTTP request, current while the app (and a
    streamed body) runs; it continues a caller's traceparent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = _tracer
        if tracer is None or scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        carrier = {
            key.decode("latin-1"): value.decode("latin-1")
            for key, value in scope["headers"]
            if key in (b"traceparent", b"tracestate")
        }
        method: str = scope["method"]
        path: str = scope["path"]
        with tracer.start_as_current_span(
            f"{method} {path}",
            context=extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status: int = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR, str(status)))
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            except Exception as error:
                span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                raise
