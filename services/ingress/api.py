"""HTTP routes: /v1/chat/completions (SSE and JSON), /v1/models, /healthz.

Its size (~630 lines): the chat route's ladder of checks, its hand-off to the pipeline and the
reading of its events (n choices, a schema check, repeated hand-offs) into the two answer
shapes, which share the request's state; the wire format of the answer is in `answers.py`,
the request's in `schema.py` and `headers.py`, the other endpoints' shapes in `shapes.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from llooma import bus, subjects, tracing
from llooma.keys import KeyBook, KeyRecord
from llooma.ledger.balances import BalanceBook
from llooma.membership import RACER_CHECK_S, RACER_MISSED_BEATS, HostDirectory, ServiceDirectory
from llooma.metrics import StatsCollector
from llooma.names import SERVICES, path_name
from llooma.planning import bypass_plan
from llooma.privacy import Mapping
from llooma.race_records import race_key, racer_of, races_bucket
from llooma.runtime import instance_service
from llooma.selection import asked_features
from llooma.settings import ORCHESTRATED_MODEL, Settings, api_key_id
from llooma.v1.common_pb2 import (
    ERROR_CODE_CONTROL_PLANE_UNAVAILABLE,
    ERROR_CODE_DEADLINE_EXCEEDED,
    REQUEST_PATH_SPLIT,
    ErrorDetail,
    GenerationParams,
)
from llooma.v1.pipeline_pb2 import (
    PRIVACY_MODE_OFF,
    PRIVACY_MODE_STRICT,
    PRIVACY_MODE_UNSPECIFIED,
    ChatRequest,
    ClientDelta,
    ClientEvent,
    PrivacyMode,
    RaceResume,
)
from llooma.v1.plan_pb2 import Plan
from services.ingress.answers import (
    Answer,
    EventStream,
    Restorers,
    error_shape,
    header_value,
    restore,
    sse_event,
    usage_json,
)
from services.ingress.choices import merged
from services.ingress.delivery import DeliveryReporter
from services.ingress.headers import InvalidHeader, RequestOptions, parse_options
from services.ingress.limits import Limits, Ticket
from services.ingress.replies import ReplyRouter
from services.ingress.schema import (
    ChatCompletionRequest,
    describe_validation_error,
    error_response,
)
from services.ingress.shapes import AnswerShape
from services.ingress.shared_limits import SharedRateLimits
from services.ingress.structured import checked

log = logging.getLogger(__name__)

# How much longer than the first-token deadline the pipeline may take to say anything at all.
PIPELINE_MARGIN_S = 10.0
# Beyond the racer's own stall deadline, how long the ingress waits before giving up itself.
STALL_MARGIN_S = 5.0

# How long a model stays known after its last host left: requests for it get 503 (retried by
# clients) rather than 404 (never retried) while its hosts restart or reconnect.
KNOWN_MODEL_MEMORY_S = 600.0


class BodyTooLarge(Exception):
    pass


@dataclass
class Relayed:
    """What a single-choice answer's client received, as the racer sent it (placeholders not
    restored): where another racer resumes it if its racer stops."""

    text: list[str]
    tokens: int = 0
    tool_calls: bool = False

    def add(self, delta: ClientDelta) -> None:
        self.text.append(delta.text)
        self.tokens += delta.tokens
        self.tool_calls = self.tool_calls or bool(delta.tool_calls_json)


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
        # Keys managed by accounting (Postgres), through the keys bucket; env keys beside them.
        self.keys: KeyBook | None = None
        # What each client received, for billing (accounting re-bills incomplete requests).
        self.deliveries: DeliveryReporter | None = None
        # Per-key rates held across every ingress (NATS counters), when on.
        self.shared_limits: SharedRateLimits | None = None
        self.stats: StatsCollector | None = None
        self.limits = Limits(self.settings, self.hosts)
        # The races bucket, opened when a request first waits long for its first event.
        self._races: KeyValue | None = None
        self._models_seen: dict[str, float] = {}

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
        # A keyed hash: matching it in a dict leaks nothing a guesser could use.
        record = self.keys.get(candidate) if self.keys is not None else None
        if record is not None and not record.expired():
            return candidate
        return None

    def _record(self, key_id: str) -> KeyRecord | None:
        return self.keys.get(key_id) if self.keys is not None else None

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

    # -- routes ----------------------------------------------------------------------------

    async def chat_completions(
        self, request: Request, shape: AnswerShape | None = None
    ) -> Response:
        """A request, and every refusal counted by status and reason (counters only). `shape`:
        another endpoint's request and answer format around the same race (None: chat)."""
        response = await self._chat_completions(request, shape)
        if response.status_code >= 400 and self.stats is not None:
            self.stats.rejected(response.status_code, _error_code(response))
        return response

    async def _chat_completions(self, request: Request, shape: AnswerShape | None) -> Response:
        """Every check a request passes before it reaches NATS, cheapest first; each step
        answers with OpenAI's error shape or hands on what it found."""
        key_id = self._authenticate(request)
        if key_id is None:
            return _invalid_api_key()
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
        parsed = await self._parse(request, shape)
        if isinstance(parsed, Response):
            return parsed
        record = self._record(key_id)
        if record is not None and not record.allows(parsed.model):
            # As OpenAI answers a model the key has no access to.
            return error_response(
                404,
                f"model {parsed.model!r} does not exist or this API key may not use it",
                code="model_not_found",
            )
        unavailable = self._model_unavailable(parsed.model)
        if unavailable is not None:
            return unavailable
        try:
            options = parse_options(request.headers)
        except InvalidHeader as error:
            return error_response(400, str(error), code="invalid_request")
        rates = (record.rpm, record.tpm) if record is not None else None
        release = None
        if self.shared_limits is not None:
            shared = await self.shared_limits.admit(key_id, parsed, rates)
            if isinstance(shared, Response):
                return shared
            release = shared
        ticket = self.limits.admit(key_id, parsed, rates, release)
        if not isinstance(ticket, Ticket):
            if release is not None:
                release(0)
            return ticket
        if self.shared_limits is not None:
            ticket.rate_headers = self.shared_limits.headers(key_id, rates)
        return await ticket.serve(self._complete(parsed, key_id, options, ticket, shape))

    async def _parse(
        self, request: Request, shape: AnswerShape | None
    ) -> ChatCompletionRequest | Response:
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
            if shape is not None:
                return shape.parse(text)
            return ChatCompletionRequest.model_validate_json(text, strict=True)
        except ValidationError as error:
            return error_response(400, describe_validation_error(error), code="invalid_request")

    def _model_unavailable(self, model: str) -> Response | None:
        """404 for a model no host has announced lately; 503 with Retry-After for one whose
        hosts are all gone for now (clients retry a 503, never a 404)."""
        if model == ORCHESTRATED_MODEL:
            return None
        now = time.monotonic()
        known = self.hosts.known_models()
        for name in known:
            self._models_seen[name] = now
        if model in known:
            return None
        seen = self._models_seen.get(model)
        if seen is not None and now - seen < KNOWN_MODEL_MEMORY_S:
            return error_response(
                503,
                f"no live host serves model {model!r} right now",
                error_type="server_error",
                code="no_eligible_host",
                headers={"retry-after": str(self.settings.shed_retry_after_s)},
            )
        return error_response(404, f"model {model!r} does not exist", code="model_not_found")

    def _privacy_mode(self, key_id: str, requested: str) -> PrivacyMode.ValueType:
        if requested == "strict":
            return PRIVACY_MODE_STRICT
        if key_id in self._privacy_off and not requested:
            return PRIVACY_MODE_OFF
        return PRIVACY_MODE_UNSPECIFIED

    async def _complete(
        self,
        parsed: ChatCompletionRequest,
        key_id: str,
        options: RequestOptions,
        ticket: Ticket,
        shape: AnswerShape | None,
    ) -> Response:
        accepted_at = time.monotonic()
        request_id = uuid.uuid4().hex
        tracing.annotate_chat(request_id, parsed.model)
        params = parsed.params_proto()
        chat = ChatRequest(
            request_id=request_id,
            model=parsed.model,
            messages=parsed.messages_proto(),
            params=params,
            stream=parsed.stream,
            reply_subject=self.replies.subject_for(request_id),
            api_key_id=key_id,
            accepted_unix_nanos=time.time_ns(),
            first_token_deadline_ms=options.deadline_ms,
            race_width=options.race_width,
            plan=_plan(params, options, parsed.n),
            choices=parsed.n,
            privacy=self._privacy_mode(key_id, options.privacy),
        )
        if shape is not None:
            shape.prepare(chat)
        queue = self.replies.open(request_id)
        try:
            return await self._answer(chat, parsed, ticket, queue, accepted_at, shape)
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
        shape: AnswerShape | None,
    ) -> Response:
        request_id = chat.request_id
        headers = {
            "x-llooma-request-id": request_id,
            "x-request-id": request_id,
            **ticket.rate_headers,
        }
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
        first = await self._first_event(request_id, queue, first_wait_s)
        restorers = None
        # More than one mapping: privacy's hand-off was redelivered; the first is the one the
        # request went on with (the planner's hand-off is deduplicated).
        while first.WhichOneof("event") == "mapping":
            if restorers is None:
                # Lives only as long as this request, in this process.
                restorers = Restorers(
                    Mapping.from_dict({e.placeholder: e.original for e in first.mapping.entries})
                )
            first = await self._first_event(request_id, queue, first_wait_s)
        if restorers is None and chat.privacy != PRIVACY_MODE_OFF:
            # Privacy redacted nothing (it sends no empty mapping): placeholders a model makes
            # up are still turned into neutral words.
            restorers = Restorers(Mapping())
        kind = first.WhichOneof("event")
        if kind != "started":
            await self._end(request_id, finished=False)
            if self.stats is not None:
                self.stats.request_failed()
            if self.deliveries is not None:
                # A race that runs on regardless (its events lost) is not the user's to pay.
                self.deliveries.nothing_delivered(chat)
            if kind != "failed":
                log.error("request %s: %s before it started", request_id, kind)
            return self._failure_response(first.failed, headers)
        headers["x-llooma-path"] = path_name(first.started.path)
        if self.stats is not None:
            self.stats.request_started(
                request_id, headers["x-llooma-path"], time.monotonic() - accepted_at
            )
        if first.started.plan_decision:
            # Header values must be latin-1: the decision is ASCII apart from model names.
            headers["x-llooma-plan"] = header_value(first.started.plan_decision)
        if first.started.host_id:
            headers["x-llooma-host"] = header_value(first.started.host_id)
        if first.started.model:
            headers["x-llooma-model"] = header_value(first.started.model)
        # One race (or a split request's aggregator) relays a single answer: its death ends
        # the stream at once, or has a racer resume it.
        racer = first.started.racer_instance_id if parsed.n == 1 else ""
        split = first.started.path == REQUEST_PATH_SPLIT
        stream = self._events(request_id, queue, restorers, parsed.n, racer, split)
        if parsed.n > 1:
            stream = merged(stream, parsed.n)
        stream = ticket.watch(stream)
        schema = parsed.answer_schema()
        if schema is not None:
            stream = checked(stream, schema)
        if self.deliveries is not None:
            stream = self.deliveries.watch(chat, stream)
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)

            async def on_close() -> None:
                ticket.release()
                await self._end(request_id, finished=False)

            return EventStream(
                # `model` echoes the request (x-llooma-model names the one that answered).
                self._sse(request_id, parsed.model, stream, include_usage, parsed.n > 1)
                if shape is None
                else shape.stream(request_id, parsed, stream),
                on_close=on_close,
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache"},
            )
        async with contextlib.aclosing(stream):
            if shape is not None:
                return await shape.collect(
                    request_id, parsed, stream, headers, self._failure_response
                )
            return await self._collect(request_id, parsed, stream, headers)

    async def _next_event(self, queue: asyncio.Queue[bytes], timeout_s: float) -> ClientEvent:
        try:
            async with asyncio.timeout(timeout_s):
                return ClientEvent.FromString(await queue.get())
        except TimeoutError:
            return _no_progress(timeout_s)

    async def _next_live_event(
        self, queue: asyncio.Queue[bytes], timeout_s: float, racer: str
    ) -> ClientEvent | None:
        """As `_next_event`, but a wait longer than `RACER_CHECK_S` asks whether the racer
        relaying the answer still beats: None as soon as it has stopped (its race died with
        it; waiting on would only reach the stall limit)."""
        if not racer:
            return await self._next_event(queue, timeout_s)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout_s
        while True:
            wait_s = min(RACER_CHECK_S, give_up_at - loop.time())
            if wait_s <= 0:
                return _no_progress(timeout_s)
            try:
                async with asyncio.timeout(wait_s):
                    return ClientEvent.FromString(await queue.get())
            except TimeoutError:
                silent_s = RACER_MISSED_BEATS * self.settings.heartbeat_interval_s
                if self.services.gone(racer, silent_s):
                    return None

    async def _first_event(
        self, request_id: str, queue: asyncio.Queue[bytes], timeout_s: float
    ) -> ClientEvent:
        """As `_next_event`, but a wait longer than `RACER_CHECK_S` looks up which racer runs
        the request's race (its record in the races bucket, once found) and asks whether it
        still beats: once it has stopped, another racer runs the race again, or the whole of
        a split request's answer (the client has received nothing), and its `started` is
        returned."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout_s
        racer = ""
        while True:
            wait_s = min(RACER_CHECK_S, give_up_at - loop.time())
            if wait_s <= 0:
                return _no_progress(timeout_s)
            try:
                async with asyncio.timeout(wait_s):
                    return ClientEvent.FromString(await queue.get())
            except TimeoutError:
                pass
            if not racer:
                if self._races is None:
                    with contextlib.suppress(Exception):  # asked again at the next check
                        self._races = await races_bucket(self.js)
                if self._races is not None:
                    racer = await racer_of(self._races, race_key(request_id))
            silent_s = RACER_MISSED_BEATS * self.settings.heartbeat_interval_s
            if racer and self.services.gone(racer, silent_s):
                split = instance_service(racer) == "aggregator"
                return await self._resume(request_id, queue, Relayed([]), racer, split)

    async def _resume(
        self,
        request_id: str,
        queue: asyncio.Queue[bytes],
        relayed: Relayed,
        racer: str,
        split: bool = False,
    ) -> ClientEvent:
        """The racer (`split`: the aggregator) running the answer stopped: ask a live racer
        to finish the answer from what the client received. Its first event (`started`)
        names it: the racer to watch from then on; anything else ends the request."""
        log.warning("%s stopped while relaying request %s: resuming", racer, request_id)
        if relayed.tool_calls:
            return _racer_stopped("a tool call is never continued on another host")
        if split:
            # The dead aggregator's node races run on for a reader that is gone: stopped
            # (each settled by its own racer). Sent before the hand-off, so every racer has
            # handled it before the resume arrives, which runs only after its claim.
            await self._cancel(request_id)
        resume = RaceResume(
            request_id=request_id,
            reply_subject=self.replies.reroute(request_id),
            emitted="".join(relayed.text),
            delivered_tokens=relayed.tokens,
            racer_instance_id=racer,
        )
        try:
            await bus.hand_off(
                self.js, subjects.PIPELINE_RESUME, resume.SerializeToString(), resume.reply_subject
            )
        except Exception:
            return _racer_stopped("the control plane is not reachable")
        # The resuming racer answers at once, before its host's first token.
        return await self._next_event(queue, PIPELINE_MARGIN_S)

    async def _events(
        self,
        request_id: str,
        queue: asyncio.Queue[bytes],
        restorers: Restorers | None,
        choices: int,
        racer: str = "",
        split: bool = False,
    ) -> AsyncGenerator[list[ClientEvent]]:
        """Events after `started`, in batches of what had already arrived, ending with the
        last choice's `finished` or a `failed`; cancels the request upstream if the consumer
        stops early."""
        # The racer's own stall deadline plus a continuation's time to its first token.
        settings = self.settings
        stall_s = (
            settings.stall_deadline_ms + settings.fallback_first_token_ms
        ) / 1000.0 + STALL_MARGIN_S
        done = False
        unfinished = choices
        relayed = Relayed([])
        try:
            while not done:
                batch = []
                event = await self._next_live_event(queue, stall_s, racer)
                while event is None:
                    resumed = await self._resume(request_id, queue, relayed, racer, split)
                    if resumed.WhichOneof("event") != "started":
                        event = resumed
                    else:
                        # A racer relays the answer from now on.
                        racer, split = resumed.started.racer_instance_id, False
                        event = await self._next_live_event(queue, stall_s, racer)
                while True:
                    kind = event.WhichOneof("event")
                    # Another `mapping` or `started` comes from a hand-off redelivered under
                    # load (privacy or the racer ran it twice): already taken, not the client's.
                    # (The later choices' `started` of n > 1 are dropped here too.)
                    if kind not in ("mapping", "started"):
                        batch.append(event)
                        if kind == "finished":
                            unfinished -= 1
                        if kind == "failed" or unfinished == 0:
                            done = True
                            break
                    if queue.empty():
                        break
                    event = ClientEvent.FromString(queue.get_nowait())
                if not batch:
                    continue
                if racer:
                    for one in batch:
                        if one.HasField("delta"):
                            relayed.add(one.delta)
                if restorers is not None:
                    batch = restore(batch, restorers)
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
        status, error_type, code = error_shape(failure)
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
        many: bool,
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
                yield b"".join(sse_event(head, event, include_usage, many) for event in batch)

    async def _collect(
        self,
        request_id: str,
        parsed: ChatCompletionRequest,
        batches: AsyncIterator[list[ClientEvent]],
        headers: dict[str, str],
    ) -> Response:
        answers = [Answer(bool(parsed.logprobs), index) for index in range(parsed.n)]
        async for batch in batches:
            for event in batch:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    answers[event.choice_index].add(event.delta)
                elif kind == "finished":
                    body = {
                        "id": f"chatcmpl-{request_id}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": parsed.model,
                        "choices": [a.choice(event.finished.finish_reason) for a in answers],
                        "usage": usage_json(event),
                    }
                    return Response(
                        orjson.dumps(body), media_type="application/json", headers=headers
                    )
                else:
                    return self._failure_response(event.failed, headers)
        return self._failure_response(ErrorDetail(message="stream ended early"), headers)

    async def models(self, request: Request) -> Response:
        if self._authenticate(request) is None:
            return _invalid_api_key()
        names = [ORCHESTRATED_MODEL, *sorted(self.hosts.models())]
        return JSONResponse({"object": "list", "data": [_model_card(name) for name in names]})

    async def model(self, request: Request) -> Response:
        if self._authenticate(request) is None:
            return _invalid_api_key()
        name = request.path_params["model"]
        if name != ORCHESTRATED_MODEL and name not in self.hosts.models():
            return error_response(
                404, f"model {name!r} does not exist", code="model_not_found", param="model"
            )
        return JSONResponse(_model_card(name))

    async def healthz(self, _: Request) -> Response:
        ready = self.services.ready_instances()
        services = {name: ready.get(name, 0) for name in SERVICES}
        hosts = len(self.hosts.serving())
        healthy = all(services.values()) and hosts > 0
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable", "services": services, "hosts": hosts},
            status_code=200 if healthy else 503,
        )


def _plan(params: GenerationParams, options: RequestOptions, choices: int) -> Plan | None:
    if options.no_split:
        return bypass_plan("the client asked for no split")
    if choices > 1:
        return bypass_plan("each of several choices is one race")
    features = asked_features(params)
    if features:
        return bypass_plan(f"{', '.join(sorted(features))} need one host's whole answer")
    return None


def _no_progress(timeout_s: float) -> ClientEvent:
    log.warning("no event for a request for %.1f s", timeout_s)
    return ClientEvent(
        failed=ErrorDetail(
            code=ERROR_CODE_DEADLINE_EXCEEDED,
            message=f"no progress from the control plane for {timeout_s:.1f} s",
        )
    )


def _invalid_api_key() -> Response:
    return error_response(
        401, "missing or invalid API key", error_type="authentication_error", code="invalid_api_key"
    )


def _error_code(response: Response) -> str:
    """The `code` of an error response in OpenAI's shape (the refusal path only)."""
    try:
        code = orjson.loads(response.body)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "unknown"
    return str(code or "unknown")


def _model_card(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "llooma"}


def _is_ascii_number(value: str) -> bool:
    # Not str.isdigit: "²".isdigit() holds (a latin-1 header byte), and int("²") raises.
    return value.isascii() and value.isdecimal()


def _racer_stopped(why: str) -> ClientEvent:
    return ClientEvent(
        failed=ErrorDetail(
            code=ERROR_CODE_CONTROL_PLANE_UNAVAILABLE,
            message=f"the racer relaying this answer stopped and it cannot be resumed ({why}); "
            "the answer is incomplete",
        )
    )
