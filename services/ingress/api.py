"""HTTP routes: /v1/chat/completions (SSE and JSON), /v1/models, /healthz."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llooma import bus, subjects, tracing
from llooma.ledger.balances import BalanceBook
from llooma.membership import HostDirectory, ServiceDirectory
from llooma.metrics import StatsCollector
from llooma.privacy import Mapping, StreamRestorer
from llooma.settings import ORCHESTRATED_MODEL, Settings, api_key_id
from llooma.v1.common_pb2 import (
    ERROR_CODE_DEADLINE_EXCEEDED,
    ERROR_CODE_HOST_BUSY,
    ERROR_CODE_HOST_FAILED,
    ERROR_CODE_NO_ELIGIBLE_HOST,
    ERROR_CODE_REQUEST_REJECTED,
    REQUEST_PATH_FALLBACK,
    REQUEST_PATH_SPLIT,
    ErrorDetail,
)
from llooma.v1.pipeline_pb2 import (
    PRIVACY_MODE_OFF,
    PRIVACY_MODE_STRICT,
    PRIVACY_MODE_UNSPECIFIED,
    ChatRequest,
    ClientDelta,
    ClientEvent,
    PrivacyMode,
)
from llooma.v1.plan_pb2 import Plan
from services.ingress.limits import Limits, Ticket
from services.ingress.replies import ReplyRouter
from services.ingress.schema import (
    ChatCompletionRequest,
    describe_validation_error,
    error_response,
)

SERVICES = (
    "ingress",
    "privacy",
    "planner",
    "dispatcher",
    "racer",
    "compressor",
    "aggregator",
    "accounting",
)

# How much longer than the first-token deadline the pipeline may take to say anything at all.
PIPELINE_MARGIN_S = 10.0
# Beyond the racer's own stall deadline, how long the ingress waits before giving up itself.
STALL_MARGIN_S = 5.0

STATUS_BY_ERROR = {
    ERROR_CODE_NO_ELIGIBLE_HOST: (503, "no_eligible_host"),
    ERROR_CODE_HOST_BUSY: (503, "hosts_busy"),
    ERROR_CODE_DEADLINE_EXCEEDED: (504, "deadline_exceeded"),
    ERROR_CODE_HOST_FAILED: (502, "host_failed"),
}

# A client may set its own first-token deadline δ for one request.
DEADLINE_HEADER = "x-llooma-first-token-deadline-ms"
# ... and how many hosts race for it (1 to 3).
RACE_WIDTH_HEADER = "x-llooma-race-width"
# ... whether quasi-identifiers are redacted too ("strict") or not ("standard", the default).
PRIVACY_HEADER = "x-llooma-privacy"
# ... and whether the planner may split it ("auto", the default, or "off").
SPLIT_HEADER = "x-llooma-split"

PATH_NAMES = {REQUEST_PATH_SPLIT: "split", REQUEST_PATH_FALLBACK: "fallback"}


class BodyTooLarge(Exception):
    pass


class _EventStream(StreamingResponse):
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


@dataclass
class Ingress:
    settings: Settings
    nc: Client
    js: JetStreamContext
    replies: ReplyRouter
    hosts: HostDirectory
    services: ServiceDirectory

    def __post_init__(self) -> None:
        self._key_ids = {api_key_id(key) for key in self.settings.api_keys}
        self._privacy_off = {api_key_id(key) for key in self.settings.privacy_off_api_keys}
        # Balances come from accounting through KV, never from Postgres on this path.
        self.balances: BalanceBook | None = None
        self.stats: StatsCollector | None = None
        self.limits = Limits(self.settings, self.hosts)

    # -- helpers ---------------------------------------------------------------------------

    def _authenticate(self, request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            return None
        candidate = api_key_id(key.strip())
        for known in self._key_ids:
            if hmac.compare_digest(candidate, known):
                return known
        return None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and _is_ascii_number(declared) and int(declared) > limit:
            raise BodyTooLarge
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def _out_of_credit(self, key_id: str) -> bool:
        if not self.settings.billing_enabled or self.balances is None:
            return False
        return self.balances.refuses(key_id)

    def _known_model(self, model: str) -> bool:
        return model == ORCHESTRATED_MODEL or model in self.hosts.known_models()

    # -- routes ----------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        key_id = self._authenticate(request)
        if key_id is None:
            return error_response(
                401,
                "missing or invalid API key",
                error_type="authentication_error",
                code="invalid_api_key",
            )
        if self._out_of_credit(key_id):
            return error_response(
                402,
                "this API key's balance is exhausted; add credits (`llooma ledger credit`)",
                error_type="insufficient_quota",
                code="insufficient_balance",
            )
        shed = self.limits.shed_early()
        if shed is not None:
            return shed
        try:
            body = await self._read_body(request)
        except BodyTooLarge:
            return error_response(
                413,
                f"request body exceeds {self.settings.max_body_bytes} bytes",
                code="body_too_large",
            )
        except ClientDisconnect:
            return Response(status_code=400)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            return error_response(
                400,
                f"body is not valid UTF-8: {error.reason} at byte {error.start}",
                code="invalid_utf8",
            )
        try:
            parsed = ChatCompletionRequest.model_validate_json(text, strict=True)
        except ValidationError as error:
            return error_response(400, describe_validation_error(error), code="invalid_request")
        if not self._known_model(parsed.model):
            return error_response(
                404,
                f"model {parsed.model!r} does not exist or no live host serves it",
                code="model_not_found",
            )
        deadline_header = request.headers.get(DEADLINE_HEADER, "")
        deadline_ms = 0
        if deadline_header:
            if not _is_ascii_number(deadline_header) or not 1 <= int(deadline_header) <= 60_000:
                return error_response(
                    400,
                    f"{DEADLINE_HEADER} must be whole milliseconds from 1 to 60000",
                    code="invalid_request",
                )
            deadline_ms = int(deadline_header)
        width_header = request.headers.get(RACE_WIDTH_HEADER, "")
        if width_header and width_header not in ("1", "2", "3"):
            return error_response(
                400, f"{RACE_WIDTH_HEADER} must be 1, 2 or 3", code="invalid_request"
            )
        privacy = request.headers.get(PRIVACY_HEADER, "")
        if privacy not in ("", "standard", "strict"):
            return error_response(
                400, f"{PRIVACY_HEADER} must be standard or strict", code="invalid_request"
            )
        if privacy == "strict":
            mode = PRIVACY_MODE_STRICT
        elif key_id in self._privacy_off and not privacy:
            mode = PRIVACY_MODE_OFF
        else:
            mode = PRIVACY_MODE_UNSPECIFIED
        split = request.headers.get(SPLIT_HEADER, "auto")
        if split not in ("auto", "off"):
            return error_response(
                400, f"{SPLIT_HEADER} must be auto or off", code="invalid_request"
            )
        ticket = self.limits.admit(key_id, parsed)
        if not isinstance(ticket, Ticket):
            return ticket
        return await ticket.serve(
            self._complete(
                parsed, key_id, deadline_ms, int(width_header or 0), split == "off", mode, ticket
            )
        )

    async def _complete(
        self,
        parsed: ChatCompletionRequest,
        key_id: str,
        deadline_ms: int,
        race_width: int,
        no_split: bool,
        privacy: PrivacyMode.ValueType,
        ticket: Ticket,
    ) -> Response:
        accepted_at = time.monotonic()
        request_id = uuid.uuid4().hex
        tracing.annotate_chat(request_id, parsed.model)
        chat = ChatRequest(
            request_id=request_id,
            model=parsed.model,
            messages=parsed.messages_proto(),
            params=parsed.params_proto(),
            stream=parsed.stream,
            reply_subject=self.replies.subject_for(request_id),
            api_key_id=key_id,
            accepted_unix_nanos=time.time_ns(),
            first_token_deadline_ms=deadline_ms,
            race_width=race_width,
            plan=Plan(decision="bypass: the client asked for no split") if no_split else None,
            privacy=privacy,
        )
        queue = self.replies.open(request_id)
        try:
            return await self._answer(chat, parsed, ticket, queue, accepted_at)
        except BaseException:
            # Whatever broke (or cancelled) before the stream took the request over.
            await self._end(request_id, finished=False)
            raise

    async def _answer(
        self,
        chat: ChatRequest,
        parsed: ChatCompletionRequest,
        ticket: Ticket,
        queue: asyncio.Queue[bytes],
        accepted_at: float,
    ) -> Response:
        request_id = chat.request_id
        headers = {"x-llooma-request-id": request_id}
        try:
            await bus.hand_off(
                self.js, subjects.PIPELINE_PRIVACY, chat.SerializeToString(), request_id
            )
        except Exception:
            self.replies.close(request_id)
            return error_response(
                503,
                "the control plane is not reachable right now",
                error_type="server_error",
                code="control_plane_unavailable",
                headers={**headers, "retry-after": str(self.settings.shed_retry_after_s)},
            )
        deadline_ms = self.settings.deadline_ms(parsed.model, chat.first_token_deadline_ms)
        first_wait_s = (
            deadline_ms + self.settings.fallback_first_token_ms
        ) / 1000.0 + PIPELINE_MARGIN_S
        first = await self._next_event(queue, first_wait_s)
        restorer = None
        if first.WhichOneof("event") == "mapping":
            # Lives only as long as this request, in this process.
            restorer = StreamRestorer(
                Mapping.from_dict({e.placeholder: e.original for e in first.mapping.entries})
            )
            first = await self._next_event(queue, first_wait_s)
        kind = first.WhichOneof("event")
        if kind != "started":
            await self._end(request_id, finished=False)
            if self.stats is not None:
                self.stats.request_failed()
            return self._failure_response(first.failed, headers)
        headers["x-llooma-path"] = PATH_NAMES.get(first.started.path, "direct")
        if self.stats is not None:
            self.stats.request_started(
                request_id, headers["x-llooma-path"], time.monotonic() - accepted_at
            )
        if first.started.plan_decision:
            # Header values must be latin-1: the decision is ASCII apart from model names.
            headers["x-llooma-plan"] = _header_value(first.started.plan_decision)
        if first.started.host_id:
            headers["x-llooma-host"] = _header_value(first.started.host_id)
        if first.started.model:
            headers["x-llooma-model"] = _header_value(first.started.model)
        stream = ticket.watch(self._events(request_id, queue, restorer))
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)

            async def on_close() -> None:
                ticket.release()
                await self._end(request_id, finished=False)

            return _EventStream(
                # `model` echoes the request (x-llooma-model names the one that answered).
                self._sse(request_id, parsed.model, stream, include_usage),
                on_close=on_close,
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache"},
            )
        async with contextlib.aclosing(stream):
            return await self._collect(request_id, parsed.model, stream, headers)

    async def _next_event(self, queue: asyncio.Queue[bytes], timeout_s: float) -> ClientEvent:
        try:
            async with asyncio.timeout(timeout_s):
                return ClientEvent.FromString(await queue.get())
        except TimeoutError:
            return ClientEvent(
                failed=ErrorDetail(
                    code=ERROR_CODE_DEADLINE_EXCEEDED,
                    message=f"no progress from the control plane for {timeout_s:.1f} s",
                )
            )

    async def _events(
        self, request_id: str, queue: asyncio.Queue[bytes], restorer: StreamRestorer | None
    ) -> AsyncGenerator[list[ClientEvent]]:
        """Events after `started`, in batches of what had already arrived, ending with
        `finished` or `failed`; cancels the request upstream if the consumer stops early."""
        # The racer's own stall deadline plus a continuation's time to its first token.
        settings = self.settings
        stall_s = (
            settings.stall_deadline_ms + settings.fallback_first_token_ms
        ) / 1000.0 + STALL_MARGIN_S
        done = False
        try:
            while not done:
                batch = [await self._next_event(queue, stall_s)]
                while not queue.empty():
                    batch.append(ClientEvent.FromString(queue.get_nowait()))
                for index, event in enumerate(batch):
                    if event.WhichOneof("event") in ("finished", "failed"):
                        del batch[index + 1 :]
                        done = True
                        break
                if restorer is not None:
                    batch = _restore(batch, restorer)
                yield batch
            done = batch[-1].WhichOneof("event") == "finished"
        finally:
            await self._end(request_id, finished=done)

    async def _end(self, request_id: str, *, finished: bool) -> None:
        """Drop the request's reply queue and, unless it finished, stop it upstream; only the
        first call for a request does anything."""
        if self.replies.close(request_id) and not finished:
            await self._cancel(request_id)

    async def _cancel(self, request_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.nc.publish(subjects.request_cancel(request_id), b"")

    def _failure_response(self, failure: ErrorDetail, headers: dict[str, str]) -> Response:
        status, error_type, code = _error_shape(failure)
        if status == 503:
            headers = {**headers, "retry-after": str(self.settings.shed_retry_after_s)}
        return error_response(
            status,
            failure.message or "the request failed",
            error_type=error_type,
            code=code,
            headers=headers,
        )

    async def _sse(
        self,
        request_id: str,
        model: str,
        batches: AsyncGenerator[list[ClientEvent]],
        include_usage: bool,
    ) -> AsyncGenerator[bytes]:
        created = int(time.time())
        head = (
            b'data: {"id":"chatcmpl-' + request_id.encode() + b'","object":"chat.completion.chunk",'
            b'"created":' + str(created).encode() + b',"model":' + orjson.dumps(model) + b","
        )
        yield (
            head
            + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            + (b'"finish_reason":null}]}\n\n')
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                yield b"".join(_sse_event(head, event, include_usage) for event in batch)

    async def _collect(
        self,
        request_id: str,
        model: str,
        batches: AsyncIterator[list[ClientEvent]],
        headers: dict[str, str],
    ) -> Response:
        pieces = []
        thoughts = []
        async for batch in batches:
            for event in batch:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    pieces.append(event.delta.text)
                    if event.delta.reasoning:
                        thoughts.append(event.delta.reasoning)
                elif kind == "finished":
                    message = {"role": "assistant", "content": "".join(pieces)}
                    if thoughts:
                        message["reasoning_content"] = "".join(thoughts)
                    body = {
                        "id": f"chatcmpl-{request_id}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": message,
                                "finish_reason": event.finished.finish_reason or "stop",
                            }
                        ],
                        "usage": _usage(event),
                    }
                    return Response(
                        orjson.dumps(body), media_type="application/json", headers=headers
                    )
                else:
                    return self._failure_response(event.failed, headers)
        return self._failure_response(ErrorDetail(message="stream ended early"), headers)

    async def models(self, request: Request) -> Response:
        if self._authenticate(request) is None:
            return error_response(
                401,
                "missing or invalid API key",
                error_type="authentication_error",
                code="invalid_api_key",
            )
        names = [ORCHESTRATED_MODEL, *sorted(self.hosts.models())]
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "llooma"} for n in names]
        return JSONResponse({"object": "list", "data": data})

    async def healthz(self, _: Request) -> Response:
        ready = self.services.ready_instances()
        services = {name: ready.get(name, 0) for name in SERVICES}
        hosts = len(self.hosts.eligible())
        healthy = all(services.values()) and hosts > 0
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable", "services": services, "hosts": hosts},
            status_code=200 if healthy else 503,
        )


def _is_ascii_number(value: str) -> bool:
    # Not str.isdigit: "²".isdigit() holds (a latin-1 header byte), and int("²") raises.
    return value.isascii() and value.isdecimal()


def _restore(batch: list[ClientEvent], restorer: StreamRestorer) -> list[ClientEvent]:
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


def _sse_event(head: bytes, event: ClientEvent, include_usage: bool) -> bytes:
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
            parts.append(head + b'"choices":[],"usage":' + orjson.dumps(_usage(event)) + b"}\n\n")
        parts.append(b"data: [DONE]\n\n")
        return b"".join(parts)
    _, error_type, code = _error_shape(event.failed)
    message = event.failed.message or "the stream failed"
    error = {"error": {"message": message, "type": error_type, "code": code}}
    return b"data: " + orjson.dumps(error) + b"\n\n"


def _error_shape(failure: ErrorDetail) -> tuple[int, str, str]:
    """HTTP status, OpenAI error type and code for a failed request."""
    if failure.code == ERROR_CODE_REQUEST_REJECTED:
        # The engine refused the request itself: the client's error, with the engine's status.
        status = failure.http_status if 400 <= failure.http_status < 500 else 400
        return status, "invalid_request_error", failure.client_code or "invalid_request_error"
    status, code = STATUS_BY_ERROR.get(failure.code, (500, "internal_error"))
    return status, "server_error", code


def _header_value(value: str) -> str:
    """A latin-1-safe header value of bounded length."""
    return value.encode("ascii", "replace").decode()[:200]


def _usage(event: ClientEvent) -> dict[str, int]:
    usage = event.finished.usage
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }
