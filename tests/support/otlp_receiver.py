"""An OTLP/HTTP trace receiver that keeps spans in memory: what a collector would get.

The tests point a stack's OTEL_EXPORTER_OTLP_ENDPOINT at it; `python -m tests.support.otlp_receiver
--port N` runs it alone (for measuring the stack with tracing on) and prints the span count.
"""

from __future__ import annotations

import argparse
import gzip
import signal
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

TRACES_PATH = "/v1/traces"

Value = str | int | float | bool | bytes | list["Value"] | None


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    # SERVER, CLIENT, CONSUMER, ...
    kind: str
    attributes: dict[str, Value]
    events: tuple[tuple[str, dict[str, Value]], ...]
    status_message: str

    def texts(self) -> list[str]:
        """Every string this span carries: where prompt or answer text would show."""
        found = [self.name, self.status_message]
        for attributes in (self.attributes, *(attrs for _, attrs in self.events)):
            for key, value in attributes.items():
                found.append(key)
                found.extend(_strings(value))
        found.extend(name for name, _ in self.events)
        return found


def _strings(value: Value) -> list[str]:
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, bytes):
        return [value.decode("utf-8", "replace")]
    return [value] if isinstance(value, str) else []


def _value(any_value: AnyValue) -> Value:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return [f"{kv.key}={_value(kv.value)!r}" for kv in any_value.kvlist_value.values]
    if kind is None:
        return None
    value: Value = getattr(any_value, kind)
    return value


def _attributes(pairs: list[KeyValue]) -> dict[str, Value]:
    return {kv.key: _value(kv.value) for kv in pairs}


def decode(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest.FromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(list(resource_spans.resource.attributes))
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        service=service,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        attributes=_attributes(list(span.attributes)),
                        events=tuple(
                            (event.name, _attributes(list(event.attributes)))
                            for event in span.events
                        ),
                        status_message=span.status.message,
                    )
                )
    return spans


class OtlpReceiver:
    """Accepts OTLP/HTTP protobuf trace exports on 127.0.0.1 and keeps every span."""

    def __init__(self, port: int = 0) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                encoding = (self.headers.get("content-encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != TRACES_PATH:
                    self.send_response(404)
                    self.end_headers()
                    return
                received = decode(body)
                with receiver._lock:
                    receiver._spans.extend(received)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """The value for OTEL_EXPORTER_OTLP_ENDPOINT (the exporter appends /v1/traces)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout_s: float
    ) -> list[ReceivedSpan]:
        """Spans received so far, as soon as `done` holds for them or the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if done(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.1)


def exporting_to(receiver: OtlpReceiver) -> dict[str, str]:
    """The environment that makes a stack's processes export their spans to `receiver`."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=4318)
    port = parser.parse_args().port
    receiver = OtlpReceiver(port).start()
    print(f"OTEL_EXPORTER_OTLP_ENDPOINT={receiver.endpoint}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(5.0):
        print(f"{len(receiver.spans())} spans", flush=True)
    print(f"{len(receiver.spans())} spans in total", flush=True)
    receiver.stop()


if __name__ == "__main__":
    main()
