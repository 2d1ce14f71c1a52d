"""A backend that streams from any OpenAI-compatible server (llama.cpp, vLLM, SGLang, Ollama).

It tells the engine's truth: it asks for `stream_options.include_usage` and reports the
engine's own usage and finish_reason (Outcome.reported); it passes every sampling parameter
the client set, 0 included; an engine's refusal of the request itself (400, 413, 422) is the
client's error (UpstreamRejected), not the host's; reasoning deltas (`reasoning_content`, or
`reasoning`) come out as Reasoning pieces.

Its size (~400 lines): one engine protocol, request building and stream parsing side by
side, so what is sent and what is believed of the answer read together.
"""

from __future__ import annotations

import asyncio
import re
import sys
from array import array
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from llooma.host.http import ConnectFailed, HttpError, HttpPool, Response
from llooma.v1.common_pb2 import TASK_KIND_TEXT_COMPLETION, ChatMessage
from llooma.v1.host_pb2 import HostTask

_MESSAGE_LIMIT = 300
# An error body is only read for its message, so a misbehaving upstream cannot make us buffer MBs.
_ERROR_BODY_LIMIT = 16_384
_BUSY_STATUSES = frozenset({429, 503})
# The engine refused the request as asked: the client's error, not the host's. (401/403/404
# are the host's misconfiguration: a wrong key, a wrong model name.)
_REJECTED_STATUSES = frozenset({400, 413, 422})
# OpenAI-compatible servers (vLLM in particular) validate seed as a signed 64-bit integer.
_SEED_MASK = (1 << 63) - 1
_CONTEXT_EXCEEDED = re.compile(
    r"context length|context size|context window|maximum context|prompt is too long"
    r"|too many tokens",
    re.IGNORECASE,
)
# Longest SSE line accepted (a data line is one chunk of a few hundred bytes).
_LINE_LIMIT = 1 << 20
# How long to wait for the end of the HTTP body after `[DONE]` before dropping the connection.
_DRAIN_S = 1.0
# The largest embeddings answer read (a few thousand vectors of 1024 floats as JSON text).
_EMBEDDINGS_BODY_LIMIT = 64 << 20


class UpstreamError(Exception):
    """The upstream server failed the request; status is None for transport or stream errors."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class UpstreamBusy(UpstreamError):
    """The upstream server refused the request for lack of capacity (429 or 503)."""


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream server could be made."""


class UpstreamRejected(UpstreamError):
    """The engine refused the request itself (a prompt over the context, a bad parameter):
    `status` is its HTTP status, `client_code` an OpenAI-style code ("" when unknown),
    `message` the engine's own words."""

    def __init__(self, message: str, status: int, client_code: str) -> None:
        super().__init__(message, status)
        self.client_code = client_code


class _RetryWithoutUsage(Exception):
    """The server refused stream_options before answering anything: send it again without."""


class Reasoning(str):
    """A piece of a thinking model's reasoning (reasoning_content), not of its answer."""

    __slots__ = ()


class ToolCalls(str):
    """One chunk's `delta.tool_calls`: the JSON array as the engine sent it."""

    __slots__ = ()


class Scored(str):
    """A piece of the answer with its `logprobs.content` entries (`logprobs`: JSON, without
    the enclosing brackets)."""

    logprobs: str


@dataclass(slots=True)
class Outcome:
    """How a stream ended, filled in by the backend as it reads. `reported` is True when the
    token counts are the engine's own; otherwise the worker estimates them."""

    finish_reason: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    reported: bool = False


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """Sampling values used where the task leaves a parameter unset."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None


def _truncate(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


def _float_param(value: float) -> float:
    # Proto floats are float32, so 0.7 arrives as 0.699999988; send what the client meant.
    return round(value, 6)


def _error_message(payload: object) -> str | None:
    """The message of an error body in OpenAI, vLLM, llama.cpp or Ollama shape, if any."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        return str(message) if message is not None else orjson.dumps(error).decode()
    if isinstance(error, str):
        return error
    message = payload.get("message") or payload.get("detail")
    return str(message) if message is not None else None


def _error_status(payload: object) -> int | None:
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def client_code(payload: object, message: str) -> str:
    """An OpenAI-style error code for an engine's refusal.

    OpenAI: {"error": {"code": "context_length_exceeded", "type": "invalid_request_error"}};
    llama.cpp: {"error": {"code": 400, "type": "exceed_context_size_error", "message":
    "request (N tokens) exceeds the available context size (M tokens), ..."}}; vLLM:
    {"error"|top level: {"type": "BadRequestError", "code": 400, "message": "This model's
    maximum context length is ..."}}."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        error = payload if isinstance(payload, dict) else {}
    code = error.get("code")
    if isinstance(code, str) and code:
        return code
    if error.get("type") == "exceed_context_size_error" or _CONTEXT_EXCEEDED.search(message):
        return "context_length_exceeded"
    return ""


async def _status_error(response: Response) -> UpstreamError:
    status = response.status
    try:
        body = await response.read(_ERROR_BODY_LIMIT)
    except HttpError:
        body = b""
    try:
        payload: object = orjson.loads(body)
    except orjson.JSONDecodeError:
        payload = None
    detail = _error_message(payload)
    if detail is None:
        detail = body.decode("utf-8", errors="replace") or f"HTTP {status}"
    if status in _REJECTED_STATUSES:
        return UpstreamRejected(_truncate(detail), status, client_code(payload, detail))
    message = f"upstream returned {status}: {_truncate(detail)}"
    if status in _BUSY_STATUSES:
        return UpstreamBusy(message, status)
    return UpstreamError(message, status)


def _event_error(event: dict[str, Any], pieces: int) -> UpstreamError:
    detail = _error_message(event) or "unknown error"
    status = _error_status(event)
    if status in _REJECTED_STATUSES and not pieces:
        return UpstreamRejected(_truncate(detail), status, client_code(event, detail))
    return UpstreamError(f"upstream error mid-stream: {_truncate(detail)}", status)


def _malformed(data: bytes) -> UpstreamError:
    text = data.decode("utf-8", errors="replace")
    return UpstreamError(f"malformed stream event: {_truncate(text)}")


def completion_prompt(task: HostTask) -> str:
    """A text completion's raw prompt: the client's, plus the text so far when handed over
    (a trailing assistant message)."""
    messages = task.messages
    if not messages:
        return ""
    prompt = messages[0].content
    if len(messages) > 1 and messages[-1].role == "assistant":
        prompt += messages[-1].content
    return prompt


def estimate_input_tokens(task: HostTask) -> int:
    """About four characters a token, plus a few for each message's template."""
    return sum(len(m.content) for m in task.messages) // 4 + 4 * len(task.messages)


async def _drain(body: AsyncIterator[bytes]) -> None:
    """Read the body to its end, so the connection can carry the next request."""
    async for _ in body:
        pass


class OpenAIBackend:
    """Streams a task's completion from an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        upstream_model: str,
        *,
        defaults: GenerationDefaults,
        engine: str = "openai",
        max_connections: int = 16,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 300.0,
    ) -> None:
        self.pool = HttpPool(
            base_url,
            max_connections=max_connections,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
        )
        headers = "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        if api_key:
            headers += f"Authorization: Bearer {api_key}\r\n"
        self._headers = headers
        self._model = upstream_model
        self._defaults = defaults
        self._engine = engine
        # Cleared for good if the server refuses stream_options (a strict older server): it
        # then gives no usage, and the worker says its counts are estimates.
        self._include_usage = True

    async def aclose(self) -> None:
        await self.pool.aclose()

    def request_body(self, task: HostTask) -> dict[str, Any]:
        """The JSON body sent upstream for a task."""
        params = task.params
        defaults = self._defaults
        messages = [_message(m) for m in task.messages]
        body: dict[str, Any] = {"model": self._model}
        if task.kind == TASK_KIND_TEXT_COMPLETION:
            body["prompt"] = completion_prompt(task)
            messages = []
        else:
            body["messages"] = messages
        body |= {
            "stream": True,
            "max_tokens": params.max_tokens
            if params.HasField("max_tokens")
            else defaults.max_tokens,
        }
        if params.HasField("temperature"):
            body["temperature"] = _float_param(params.temperature)
        elif defaults.temperature is not None:
            body["temperature"] = defaults.temperature
        if params.HasField("top_p"):
            body["top_p"] = _float_param(params.top_p)
        elif defaults.top_p is not None:
            body["top_p"] = defaults.top_p
        if params.stop:
            body["stop"] = list(params.stop)
        if params.HasField("seed"):
            body["seed"] = params.seed & _SEED_MASK
        if params.HasField("presence_penalty"):
            body["presence_penalty"] = _float_param(params.presence_penalty)
        if params.HasField("frequency_penalty"):
            body["frequency_penalty"] = _float_param(params.frequency_penalty)
        # Raw JSON as the client sent it: spliced into the body, not parsed again here.
        if params.tools_json:
            body["tools"] = orjson.Fragment(params.tools_json)
        if params.tool_choice_json:
            body["tool_choice"] = orjson.Fragment(params.tool_choice_json)
        if params.HasField("parallel_tool_calls"):
            body["parallel_tool_calls"] = params.parallel_tool_calls
        if params.response_format_json:
            body["response_format"] = orjson.Fragment(params.response_format_json)
        if params.HasField("logprobs"):
            body["logprobs"] = params.logprobs
        if params.HasField("top_logprobs"):
            body["top_logprobs"] = params.top_logprobs
        if self._include_usage:
            body["stream_options"] = {"include_usage": True}
        if messages and messages[-1]["role"] == "assistant" and self._engine == "vllm":
            # Continue the trailing assistant message instead of starting a new one (llama.cpp
            # does this by itself).
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        return body

    async def embed(self, task: HostTask, outcome: Outcome) -> list[bytes]:
        """Each input's (each message's) vector from the engine's `/embeddings`, as
        little-endian float32; `outcome` gets the engine's prompt tokens."""
        body = {
            "model": self._model,
            "input": [m.content for m in task.messages],
            "encoding_format": "float",
        }
        try:
            async with self.pool.request(
                "POST", "/embeddings", orjson.dumps(body), self._headers
            ) as response:
                if response.status != 200:
                    raise await _status_error(response)
                text = await response.read(_EMBEDDINGS_BODY_LIMIT)
        except ConnectFailed as error:
            raise UpstreamUnreachable(f"upstream unreachable: {error}") from error
        except HttpError as error:
            raise UpstreamError(f"upstream transport error: {_truncate(str(error))}") from error
        try:
            payload = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise UpstreamError("embeddings answer is not JSON") from None
        vectors = _vectors(payload)
        if len(vectors) != len(task.messages):
            raise UpstreamError(f"{len(vectors)} vectors for {len(task.messages)} inputs")
        usage = payload.get("usage")
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if isinstance(prompt, int) and prompt >= 0:
            outcome.input_tokens = prompt
            outcome.reported = True
        else:
            outcome.input_tokens = estimate_input_tokens(task)
        outcome.output_tokens = 0
        outcome.finish_reason = "stop"
        return vectors

    async def stream(
        self, task: HostTask, outcome: Outcome | None = None
    ) -> AsyncGenerator[str, None]:
        """The answer's text pieces (Reasoning pieces for reasoning) as the engine sends them;
        `outcome` gets the engine's finish_reason and usage."""
        if outcome is None:
            outcome = Outcome()
        payload = orjson.dumps(self.request_body(task))
        pieces = 0
        raw_prompt = task.kind == TASK_KIND_TEXT_COMPLETION
        path = "/completions" if raw_prompt else "/chat/completions"
        # A trailing assistant message is continued (prefill). Some engines (llama.cpp with a
        # Jinja template) start their answer with that message's text again; only what comes
        # after it is new. Text is held while it still matches the prefix. (A raw prompt's
        # continuation is part of the prompt itself: nothing is echoed.)
        messages = task.messages
        prefill = (
            messages[-1].content
            if messages and messages[-1].role == "assistant" and not raw_prompt
            else ""
        )
        held = ""
        try:
            # Leaving this block, by aclose() or cancellation too, closes the connection unless
            # its response was read to the end, which is how engines notice to stop generating.
            async with self.pool.request("POST", path, payload, self._headers) as response:
                if response.status != 200:
                    error = await _status_error(response)
                    if (
                        isinstance(error, UpstreamRejected)
                        and self._include_usage
                        and "stream_options" in error.message
                    ):
                        self._include_usage = False
                        raise _RetryWithoutUsage
                    raise error
                body = response.body()
                pending = b""
                done = False
                async for data in body:
                    if pending:
                        data = pending + data
                    start = 0
                    while (end := data.find(b"\n", start)) >= 0:
                        line = data[start:end]
                        start = end + 1
                        if line.startswith(b"data:"):
                            value = line[5:].strip()
                            if value == b"[DONE]":
                                done = True
                                break
                            try:
                                event = orjson.loads(value)
                            except orjson.JSONDecodeError:
                                raise _malformed(value) from None
                            if not isinstance(event, dict):
                                raise _malformed(value)
                            if event.get("error") is not None:
                                raise _event_error(event, pieces)
                            choices = event.get("choices")
                            if choices:
                                try:
                                    choice = choices[0]
                                    delta = choice.get("delta")
                                    finish = choice.get("finish_reason")
                                    text = choice.get("text") if raw_prompt else None
                                except (AttributeError, IndexError, KeyError, TypeError):
                                    raise _malformed(value) from None
                                if text and isinstance(text, str):
                                    pieces += 1
                                    yield text
                                elif delta:
                                    content = delta.get("content")
                                    if content and prefill:
                                        content, held, prefill = _strip_echo(content, held, prefill)
                                    if content:
                                        pieces += 1
                                        scores = choice.get("logprobs")
                                        if scores:
                                            yield _scored(content, scores)
                                        else:
                                            yield content
                                    calls = delta.get("tool_calls")
                                    if calls:
                                        pieces += 1
                                        yield ToolCalls(orjson.dumps(calls).decode())
                                    thought = delta.get("reasoning_content") or delta.get(
                                        "reasoning"
                                    )
                                    if thought:
                                        pieces += 1
                                        yield Reasoning(thought)
                                if finish:
                                    outcome.finish_reason = finish
                            usage = event.get("usage")
                            if usage:
                                _read_usage(usage, outcome)
                        elif line.startswith(b"error:"):
                            # llama.cpp's server reports failures as an `error:` line.
                            value = line[6:].strip()
                            try:
                                event = orjson.loads(value)
                            except orjson.JSONDecodeError:
                                event = {"error": value.decode("utf-8", errors="replace")}
                            if not isinstance(event, dict):
                                event = {"error": str(event)}
                            raise _event_error(event, pieces)
                    if done:
                        break
                    pending = data[start:]
                    if len(pending) > _LINE_LIMIT:
                        raise UpstreamError("stream line over 1 MiB")
                if done:
                    # The end of the chunked body follows [DONE] at once; reading it keeps
                    # the connection for the next request.
                    try:
                        async with asyncio.timeout(_DRAIN_S):
                            await _drain(body)
                    except (TimeoutError, HttpError):
                        pass
        except _RetryWithoutUsage:
            async for piece in self.stream(task, outcome):
                yield piece
            return
        except ConnectFailed as error:
            raise UpstreamUnreachable(f"upstream unreachable: {error}") from error
        except HttpError as error:
            raise UpstreamError(f"upstream transport error: {_truncate(str(error))}") from error
        if held:
            # The stream ended inside what looked like the prefix: it was the answer after all.
            pieces += 1
            yield held
        if not outcome.reported:
            outcome.output_tokens = pieces


def _vectors(payload: object) -> list[bytes]:
    """An embeddings answer's vectors in input order, as little-endian float32."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise UpstreamError("embeddings answer without data")
    try:
        ordered = sorted(data, key=lambda item: item["index"])
        vectors = [array("f", item["embedding"]) for item in ordered]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise UpstreamError("malformed embeddings answer") from None
    if sys.byteorder == "big":
        for vector in vectors:
            vector.byteswap()
    return [vector.tobytes() for vector in vectors]


def _message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls_json:
        out["tool_calls"] = orjson.Fragment(message.tool_calls_json)
        # As OpenAI sends it: a turn of tool calls alone has no content.
        out["content"] = message.content or None
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def _scored(content: str, scores: object) -> str:
    entries = scores.get("content") if isinstance(scores, dict) else None
    if not entries or not isinstance(entries, list):
        return content
    piece = Scored(content)
    piece.logprobs = orjson.dumps(entries)[1:-1].decode()
    return piece


def _strip_echo(content: str, held: str, prefill: str) -> tuple[str, str, str]:
    """(text to emit now, text still held, prefix still to check: "" once decided)."""
    held += content
    if len(held) < len(prefill):
        if prefill.startswith(held):
            return "", held, prefill
        return held, "", ""
    if held.startswith(prefill):
        return held[len(prefill) :], "", ""
    return held, "", ""


def _read_usage(usage: object, outcome: Outcome) -> None:
    if not isinstance(usage, dict):
        return
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int) and prompt >= 0 and completion >= 0:
        outcome.input_tokens = prompt
        outcome.output_tokens = completion
        outcome.reported = True
