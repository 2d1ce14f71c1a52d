"""A backend that streams from any OpenAI-compatible server, plus a load probe for it."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx

from llooma.v1.host_pb2 import HostTask

_MESSAGE_LIMIT = 300
# An error body is only read for its message, so a misbehaving upstream cannot make us buffer MBs.
_ERROR_BODY_LIMIT = 16_384
_BUSY_STATUSES = frozenset({429, 503})
# OpenAI-compatible servers (vLLM in particular) validate seed as a signed 64-bit integer.
_SEED_MASK = (1 << 63) - 1
_LOAD_METRICS = (
    ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
)


class UpstreamError(Exception):
    """The upstream server failed the request; status is None for transport or stream errors."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class UpstreamBusy(UpstreamError):
    """The upstream server refused the request for lack of capacity (429 or 503)."""


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
    """The message of an error body in OpenAI, vLLM or Ollama shape, if it has one."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        return str(message) if message is not None else json.dumps(error)
    if isinstance(error, str):
        return error
    message = payload.get("message") or payload.get("detail")
    return str(message) if message is not None else None


def _error_status(payload: object) -> int | None:
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


async def _read_error_body(response: httpx.Response) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= _ERROR_BODY_LIMIT:
            break
    return bytes(body[:_ERROR_BODY_LIMIT])


async def _status_error(response: httpx.Response) -> UpstreamError:
    status = response.status_code
    body = await _read_error_body(response)
    try:
        detail = _error_message(json.loads(body))
    except ValueError:
        detail = None
    if detail is None:
        detail = body.decode("utf-8", errors="replace") or response.reason_phrase
    message = f"upstream returned {status}: {_truncate(detail)}"
    if status in _BUSY_STATUSES:
        return UpstreamBusy(message, status)
    return UpstreamError(message, status)


def _line_error(value: str) -> str:
    try:
        detail = _error_message(json.loads(value))
    except ValueError:
        detail = None
    return _truncate(detail or value)


def _delta_text(data: str) -> str:
    """The content delta of one `data:` payload; raises UpstreamError on malformed or error ones."""
    try:
        event = json.loads(data)
    except ValueError:
        raise UpstreamError(f"malformed stream event: {_truncate(data)}") from None
    if not isinstance(event, dict):
        raise UpstreamError(f"malformed stream event: {_truncate(data)}")
    if event.get("error") is not None:
        detail = _error_message(event) or "unknown error"
        raise UpstreamError(f"upstream error mid-stream: {_truncate(detail)}", _error_status(event))
    choices = event.get("choices")
    # Usage-only chunks (stream_options.include_usage) carry an empty or absent choices list.
    if not choices:
        return ""
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise UpstreamError(f"malformed stream event: {_truncate(data)}")
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


class OpenAIBackend:
    """Streams a task's completion from an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        upstream_model: str,
        *,
        defaults: GenerationDefaults,
        client: httpx.AsyncClient | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Accept": "text/event-stream"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._model = upstream_model
        self._defaults = defaults
        self._owns_client = client is None
        self._client = client if client is not None else httpx.AsyncClient()
        self._timeout = httpx.Timeout(timeout_s)

    async def aclose(self) -> None:
        """Close the HTTP client if this backend created it."""
        if self._owns_client:
            await self._client.aclose()

    def _request_body(self, task: HostTask) -> dict[str, Any]:
        """The JSON body sent upstream for a task."""
        params = task.params
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in task.messages],
            "stream": True,
            "max_tokens": params.max_tokens or self._defaults.max_tokens,
        }
        temperature = _float_param(params.temperature) if params.temperature else None
        if temperature is None:
            temperature = self._defaults.temperature
        if temperature is not None:
            body["temperature"] = temperature
        top_p = _float_param(params.top_p) if params.top_p else None
        if top_p is None:
            top_p = self._defaults.top_p
        if top_p is not None:
            body["top_p"] = top_p
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed:
            body["seed"] = params.seed & _SEED_MASK
        return body

    async def stream(self, task: HostTask) -> AsyncGenerator[str, None]:
        body = self._request_body(task)
        try:
            # Leaving this block, by aclose() or cancellation too, closes the response and with
            # it the upstream connection, which is how vLLM and friends notice to stop generating.
            async with self._client.stream(
                "POST", self._url, json=body, headers=self._headers, timeout=self._timeout
            ) as response:
                if response.status_code != 200:
                    raise await _status_error(response)
                async for raw in response.aiter_lines():
                    line = raw.strip()
                    if not line or line.startswith(":"):
                        continue
                    field, _, value = line.partition(":")
                    value = value.strip()
                    # llama.cpp's server reports failures as an `error:` line instead of data.
                    if field == "error":
                        raise UpstreamError(f"upstream error mid-stream: {_line_error(value)}")
                    if field != "data":
                        continue
                    if value == "[DONE]":
                        return
                    text = _delta_text(value)
                    if text:
                        yield text
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream transport error: {_truncate(repr(exc))}") from exc


def _parse_sample(line: str) -> tuple[str, float] | None:
    """The metric name and value of one exposition line, ignoring labels and timestamp."""
    index = 0
    length = len(line)
    while index < length and line[index] not in "{ \t":
        index += 1
    name = line[:index]
    while index < length and line[index] in " \t":
        index += 1
    if index < length and line[index] == "{":
        index += 1
        in_quotes = False
        while index < length:
            char = line[index]
            if in_quotes and char == "\\":
                index += 2
                continue
            if char == '"':
                in_quotes = not in_quotes
            elif char == "}" and not in_quotes:
                break
            index += 1
        if index >= length:
            return None
        index += 1
    fields = line[index:].split()
    if not name or not fields:
        return None
    try:
        value = float(fields[0])
    except ValueError:
        return None
    return name, value


def parse_load(text: str) -> tuple[float, float] | None:
    """(running, waiting) from a Prometheus text page of vLLM or SGLang, else None."""
    wanted = {name for pair in _LOAD_METRICS for name in pair}
    totals: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        sample = _parse_sample(line)
        if sample is None or sample[0] not in wanted:
            continue
        name, value = sample
        # A NaN or infinite gauge would poison the sum; treat it as no data for that series.
        if math.isfinite(value):
            totals[name] = totals.get(name, 0.0) + value
        else:
            totals.setdefault(name, 0.0)
    for running, waiting in _LOAD_METRICS:
        if running in totals or waiting in totals:
            return totals.get(running, 0.0), totals.get(waiting, 0.0)
    return None


async def scrape_load(client: httpx.AsyncClient, metrics_url: str) -> tuple[float, float] | None:
    """(running, waiting) requests scraped from a vLLM or SGLang /metrics, or None."""
    try:
        response = await client.get(metrics_url)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_load(response.text)
