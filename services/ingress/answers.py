"""The answer's wire format: OpenAI's `chat.completion.chunk` events, the error shape of a
failed request, and the SSE response that ends its request however the stream ends. Pure
functions of the `ClientEvent`s (the route in `api.py` decides which to send)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llooma.privacy import Mapping, StreamRestorer
from llooma.v1.common_pb2 import (
    ERROR_CODE_CONTROL_PLANE_UNAVAILABLE,
    ERROR_CODE_DEADLINE_EXCEEDED,
    ERROR_CODE_HOST_BUSY,
    ERROR_CODE_HOST_FAILED,
    ERROR_CODE_INVALID_OUTPUT,
    ERROR_CODE_NO_ELIGIBLE_HOST,
    ERROR_CODE_REQUEST_REJECTED,
    ErrorDetail,
)
from llooma.v1.pipeline_pb2 import ClientDelta, ClientEvent
from services.ingress.schema import MAX_CHOICES

STATUS_BY_ERROR = {
    ERROR_CODE_NO_ELIGIBLE_HOST: (503, "no_eligible_host"),
    ERROR_CODE_HOST_BUSY: (503, "hosts_busy"),
    ERROR_CODE_DEADLINE_EXCEEDED: (504, "deadline_exceeded"),
    ERROR_CODE_HOST_FAILED: (502, "host_failed"),
    ERROR_CODE_INVALID_OUTPUT: (502, "invalid_structured_output"),
    ERROR_CODE_CONTROL_PLANE_UNAVAILABLE: (503, "control_plane_unavailable"),
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


class Restorers:
    """One StreamRestorer per choice: a placeholder may span two deltas of one choice, never
    two choices'. Tool-call arguments get their own, one per call, with the originals
    JSON-escaped (the arguments are JSON text); with nothing redacted they are relayed as
    the engine sent them."""

    def __init__(self, mapping: Mapping) -> None:
        self._mapping = mapping
        self._by_choice: dict[int, StreamRestorer] = {}
        self._escaped = {p: orjson.dumps(o).decode()[1:-1] for p, o in mapping.items()}
        self._arguments: dict[tuple[int, int], StreamRestorer] = {}

    def of(self, choice: int) -> StreamRestorer:
        restorer = self._by_choice.get(choice)
        if restorer is None:
            restorer = self._by_choice[choice] = StreamRestorer(self._mapping)
        return restorer

    def tool_calls(self, choice: int, fragment: str) -> str:
        """One `delta.tool_calls` array with the originals back in its arguments."""
        if not self._escaped or "[" not in fragment:
            return fragment
        calls = orjson.loads(fragment)
        for call in calls:
            function = call.get("function")
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str) and arguments:
                key = (choice, call.get("index", 0))
                restorer = self._arguments.get(key)
                if restorer is None:
                    restorer = self._arguments[key] = StreamRestorer(self._escaped)
                function["arguments"] = restorer.feed(arguments)
        return orjson.dumps(calls).decode()

    def tool_call_tails(self, choice: int) -> list[str]:
        """What the choice's argument restorers still hold, as fragments, at its end."""
        tails = []
        for (owner, index), restorer in self._arguments.items():
            tail = restorer.flush() if owner == choice else ""
            if tail:
                fragment = [{"index": index, "function": {"arguments": tail}}]
                tails.append(orjson.dumps(fragment).decode())
        return tails


def restore(batch: list[ClientEvent], restorers: Restorers) -> list[ClientEvent]:
    """Put the originals back into the deltas, also when a placeholder spans two of them."""
    restored = []
    for event in batch:
        kind = event.WhichOneof("event")
        choice = event.choice_index
        if kind == "delta":
            delta = event.delta
            if delta.text:
                delta.text = restorers.of(choice).feed(delta.text)
            elif not delta.reasoning:
                for i, fragment in enumerate(delta.tool_calls_json):
                    delta.tool_calls_json[i] = restorers.tool_calls(choice, fragment)
        elif kind == "finished":
            tail = restorers.of(choice).flush()
            if tail:
                restored.append(ClientEvent(delta=ClientDelta(text=tail), choice_index=choice))
            calls = restorers.tool_call_tails(choice)
            if calls:
                tool_tail = ClientDelta(tool_calls_json=calls)
                restored.append(ClientEvent(delta=tool_tail, choice_index=choice))
        restored.append(event)
    return restored


# `"choices":[{"index":i,` for every choice a request may ask (schema.MAX_CHOICES).
_CHOICE_HEADS = tuple(b'"choices":[{"index":%d,' % index for index in range(MAX_CHOICES))


def sse_event(head: bytes, event: ClientEvent, include_usage: bool, many: bool = False) -> bytes:
    """One event's SSE bytes; `many`: the request has several choices, each finished by a
    delta of its own, so its `finished` only closes the stream."""
    kind = event.WhichOneof("event")
    if kind == "delta":
        delta = event.delta
        text = delta.text
        reasoning = delta.reasoning
        # A delta carries text and reasoning, or tool calls, or a choice's finish: never two of
        # these (the racer and `restore` keep them apart), so text pays for no other check.
        if text or reasoning:
            if not reasoning:
                body = b'{"content":' + orjson.dumps(text) + b"}"
            else:
                # As OpenAI-compatible servers relay a thinking model's reasoning.
                body = b'{"reasoning_content":' + orjson.dumps(reasoning)
                if text:
                    body += b',"content":' + orjson.dumps(text)
                body += b"}"
            logprobs = delta.logprobs_json
            if logprobs:
                body += b',"logprobs":{"content":[' + logprobs.encode() + b"]}"
            return (
                head
                + _CHOICE_HEADS[event.choice_index]
                + b'"delta":'
                + body
                + b',"finish_reason":null}]}\n\n'
            )
        choice = head + _CHOICE_HEADS[event.choice_index]
        if delta.finish_reason:
            finish = orjson.dumps(delta.finish_reason)
            return choice + b'"delta":{},"finish_reason":' + finish + b"}]}\n\n"
        # Each engine chunk's tool_calls exactly as it sent them, one client chunk each.
        return b"".join(
            choice + b'"delta":{"tool_calls":' + calls.encode() + b'},"finish_reason":null}]}\n\n'
            for calls in delta.tool_calls_json
        ) or (choice + b'"delta":{"content":""},"finish_reason":null}]}\n\n')

    if kind == "finished":
        parts = []
        if not many:
            finish = orjson.dumps(event.finished.finish_reason or "stop")
            parts.append(
                head + b'"choices":[{"index":0,"delta":{},"finish_reason":' + finish + b"}]}\n\n"
            )
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


class Answer:
    """A non-streaming answer's one choice, gathered from its deltas: the text, the reasoning,
    the tool calls merged from their fragments by index, the logprobs entries."""

    def __init__(self, logprobs: bool, index: int = 0) -> None:
        self.index = index
        # A choice of several: its own finish reason, from the delta that finished it.
        self.finish_reason = ""
        self._text: list[str] = []
        self._thoughts: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._logprobs: list[str] | None = [] if logprobs else None

    def add(self, delta: ClientDelta) -> None:
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
            return
        self._text.append(delta.text)
        if delta.reasoning:
            self._thoughts.append(delta.reasoning)
        for calls in delta.tool_calls_json:
            for fragment in orjson.loads(calls):
                self._merge(fragment)
        if self._logprobs is not None and delta.logprobs_json:
            self._logprobs.append(delta.logprobs_json)

    def _merge(self, fragment: dict[str, Any]) -> None:
        call = self._calls.setdefault(
            fragment.get("index", len(self._calls)),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if fragment.get("id"):
            call["id"] = fragment["id"]
        function = fragment.get("function") or {}
        for name in ("name", "arguments"):
            if function.get(name):
                call["function"][name] += function[name]

    def choice(self, finish_reason: str) -> dict[str, Any]:
        text = "".join(self._text)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self._thoughts:
            message["reasoning_content"] = "".join(self._thoughts)
        if self._calls:
            message["tool_calls"] = [self._calls[index] for index in sorted(self._calls)]
            # As OpenAI: an answer of tool calls alone has no content.
            message["content"] = text or None
        logprobs = None
        if self._logprobs is not None:
            logprobs = {"content": orjson.Fragment("[" + ",".join(self._logprobs) + "]")}
        return {
            "index": self.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self.finish_reason or finish_reason or "stop",
        }


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
