"""The answer's wire format: OpenAI's `chat.completion.chunk` events, the error shape of a
failed request, and the SSE response that ends its request however the stream ends. Pure
functions of the `ClientEvent`s (the route in `api.py` decides which to send)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llooma.privacy import StreamRestorer
from llooma.v1.common_pb2 import (
    ERROR_CODE_DEADLINE_EXCEEDED,
    ERROR_CODE_HOST_BUSY,
    ERROR_CODE_HOST_FAILED,
    ERROR_CODE_NO_ELIGIBLE_HOST,
    ERROR_CODE_REQUEST_REJECTED,
    ErrorDetail,
)
from llooma.v1.pipeline_pb2 import ClientDelta, ClientEvent

STATUS_BY_ERROR = {
    ERROR_CODE_NO_ELIGIBLE_HOST: (503, "no_eligible_host"),
    ERROR_CODE_HOST_BUSY: (503, "hosts_busy"),
    ERROR_CODE_DEADLINE_EXCEEDED: (504, "deadline_exceeded"),
    ERROR_CODE_HOST_FAILED: (502, "host_failed"),
}


class EventStream(StreamingResponse):
    """An SSE response that ends its request however it ends: Starlette cancels the stream of
    a client that left, and a generator cancelled before its first step runs no `finally`."""

    def __init__(
        self,
        content: AsyncGenerator[bytes],
        *,
        on_close: Callable[[], Awaitable[None]],
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._content.aclose()
            await self._on_close()


def restore(batch: list[ClientEvent], restorer: StreamRestorer) -> list[ClientEvent]:
    """Put the originals back into the deltas, also when a placeholder spans two of them."""
    restored = []
    for event in batch:
        kind = event.WhichOneof("event")
        if kind == "delta":
            event.delta.text = restorer.feed(event.delta.text)
        elif kind == "finished":
            tail = restorer.flush()
            if tail:
                restored.append(ClientEvent(delta=ClientDelta(text=tail)))
        restored.append(event)
    return restored


def sse_event(head: bytes, event: ClientEvent, include_usage: bool) -> bytes:
    kind = event.WhichOneof("event")
    if kind == "delta":
        delta = event.delta
        if delta.reasoning:
            # As OpenAI-compatible servers relay a thinking model's reasoning.
            body = b'{"reasoning_content":' + orjson.dumps(delta.reasoning)
            if delta.text:
                body += b',"content":' + orjson.dumps(delta.text)
            body += b"}"
        else:
            body = b'{"content":' + orjson.dumps(delta.text) + b"}"
        return head + b'"choices":[{"index":0,"delta":' + body + b',"finish_reason":null}]}\n\n'

    if kind == "finished":
        finish = orjson.dumps(event.finished.finish_reason or "stop")
        parts = [head + b'"choices":[{"index":0,"delta":{},"finish_reason":' + finish + b"}]}\n\n"]
        if include_usage:
            parts.append(
                head + b'"choices":[],"usage":' + orjson.dumps(usage_json(event)) + b"}\n\n"
            )
        parts.append(b"data: [DONE]\n\n")
        return b"".join(parts)
    return sse_error(event.failed)


def sse_error(failure: ErrorDetail) -> bytes:
    """The event that ends a stream which failed after it began (no [DONE] follows)."""
    _, error_type, code = error_shape(failure)
    message = failure.message or "the stream failed"
    error = {"error": {"message": message, "type": error_type, "code": code}}
    return b"data: " + orjson.dumps(error) + b"\n\n"


def error_shape(failure: ErrorDetail) -> tuple[int, str, str]:
    """HTTP status, OpenAI error type and code for a failed request."""
    if failure.code == ERROR_CODE_REQUEST_REJECTED:
        # The engine refused the request itself: the client's error, with the engine's status.
        status = failure.http_status if 400 <= failure.http_status < 500 else 400
        return status, "invalid_request_error", failure.client_code or "invalid_request_error"
    status, code = STATUS_BY_ERROR.get(failure.code, (500, "internal_error"))
    return status, "server_error", code


def header_value(value: str) -> str:
    """A latin-1-safe header value of bounded length."""
    return value.encode("ascii", "replace").decode()[:200]


def usage_json(event: ClientEvent) -> dict[str, int]:
    usage = event.finished.usage
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }
