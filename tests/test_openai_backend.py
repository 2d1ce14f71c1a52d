"""OpenAIBackend and scrape_load against mocked OpenAI-compatible servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from llooma.host.openai_backend import (
    GenerationDefaults,
    OpenAIBackend,
    UpstreamBusy,
    UpstreamError,
    scrape_load,
)
from llooma.v1.common_pb2 import ChatMessage, GenerationParams
from llooma.v1.host_pb2 import HostTask

BASE_URL = "http://upstream.test/v1"
DEFAULTS = GenerationDefaults(max_tokens=128, temperature=0.5, top_p=None)
Handler = Callable[[httpx.Request], httpx.Response]


def chunk(content: str | None, role: str | None = None) -> str:
    delta: dict[str, Any] = {"content": content}
    if role is not None:
        delta["role"] = role
    return "data: " + json.dumps(
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
    )


def sse(*lines: str) -> bytes:
    return "".join(f"{line}\n\n" for line in lines).encode()


def task(params: GenerationParams | None = None) -> HostTask:
    return HostTask(
        attempt_id="a1",
        model="llama-3-8b",
        messages=[
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Hi there"),
        ],
        params=params,
    )


class Recorder:
    """Answers every request with one fixed response and keeps what it received."""

    def __init__(self, response: Callable[[], httpx.Response]) -> None:
        self.requests: list[httpx.Request] = []
        self._response = response

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._response()

    def body(self) -> dict[str, Any]:
        payload: dict[str, Any] = json.loads(self.requests[-1].content)
        return payload


def streaming(body: bytes) -> Recorder:
    return Recorder(
        lambda: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    )


def backend(
    handler: Handler, api_key: str | None = None, defaults: GenerationDefaults = DEFAULTS
) -> OpenAIBackend:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return OpenAIBackend(
        BASE_URL, api_key, "meta-llama/Llama-3-8B", defaults=defaults, client=client
    )


async def collect(stream: AsyncIterator[str], into: list[str] | None = None) -> list[str]:
    pieces = into if into is not None else []
    async for piece in stream:
        pieces.append(piece)
    return pieces


class ClosableStream(httpx.AsyncByteStream):
    """Sends one event, then stalls as a slow upstream would; records being closed."""

    def __init__(self, first: bytes) -> None:
        self._first = first
        self.closed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._first
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed.set()


OK_STREAM = sse(
    ": keep-alive",
    chunk("", role="assistant"),
    chunk(None),
    chunk("Hello"),
    chunk(","),
    "",
    chunk(" world"),
    'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}',
    "data: [DONE]",
)


async def test_streams_concatenated_deltas() -> None:
    recorder = streaming(OK_STREAM)
    pieces = await collect(backend(recorder).stream(task()))
    assert pieces == ["Hello", ",", " world"]
    request = recorder.requests[0]
    assert request.method == "POST"
    assert str(request.url) == f"{BASE_URL}/chat/completions"


async def test_stops_reading_at_done() -> None:
    recorder = streaming(sse(chunk("a"), "data: [DONE]", chunk("after done")))
    assert await collect(backend(recorder).stream(task())) == ["a"]


async def test_body_uses_defaults_when_params_unset() -> None:
    recorder = streaming(OK_STREAM)
    await collect(backend(recorder).stream(task()))
    body = recorder.body()
    assert body == {
        "model": "meta-llama/Llama-3-8B",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
        ],
        "stream": True,
        "max_tokens": 128,
        "temperature": 0.5,
    }


async def test_body_prefers_task_params() -> None:
    recorder = streaming(OK_STREAM)
    params = GenerationParams(
        max_tokens=16, temperature=0.7, top_p=0.9, stop=["\n\n", "END"], seed=42
    )
    defaults = GenerationDefaults(max_tokens=128, temperature=0.5, top_p=0.95)
    await collect(backend(recorder, defaults=defaults).stream(task(params)))
    body = recorder.body()
    assert body["model"] == "meta-llama/Llama-3-8B"
    assert body["max_tokens"] == 16
    # Proto float32 noise is rounded away, so these compare exactly.
    assert body["temperature"] == 0.7
    assert body["top_p"] == 0.9
    assert body["stop"] == ["\n\n", "END"]
    assert body["seed"] == 42


async def test_body_mixes_params_and_defaults() -> None:
    recorder = streaming(OK_STREAM)
    defaults = GenerationDefaults(max_tokens=64, temperature=None, top_p=0.8)
    await collect(backend(recorder, defaults=defaults).stream(task(GenerationParams(top_p=0.5))))
    body = recorder.body()
    assert body["max_tokens"] == 64
    assert "temperature" not in body
    assert body["top_p"] == 0.5
    assert "stop" not in body
    assert "seed" not in body


async def test_authorization_only_with_key() -> None:
    with_key = streaming(OK_STREAM)
    await collect(backend(with_key, api_key="sk-test").stream(task()))
    assert with_key.requests[0].headers["authorization"] == "Bearer sk-test"

    without_key = streaming(OK_STREAM)
    await collect(backend(without_key).stream(task()))
    assert "authorization" not in without_key.requests[0].headers


async def test_non_200_carries_openai_error_message() -> None:
    error = {"error": {"message": "model 'x' not found", "type": "NotFoundError", "code": 404}}
    recorder = Recorder(lambda: httpx.Response(404, json=error))
    with pytest.raises(UpstreamError) as caught:
        await collect(backend(recorder).stream(task()))
    assert not isinstance(caught.value, UpstreamBusy)
    assert caught.value.status == 404
    assert "model 'x' not found" in str(caught.value)


async def test_non_200_message_is_truncated() -> None:
    recorder = Recorder(lambda: httpx.Response(400, json={"error": {"message": "x" * 5000}}))
    with pytest.raises(UpstreamError) as caught:
        await collect(backend(recorder).stream(task()))
    assert caught.value.status == 400
    assert "x" * 200 in str(caught.value)
    assert len(str(caught.value)) < 400


async def test_non_200_with_plain_text_body() -> None:
    recorder = Recorder(lambda: httpx.Response(502, text="Bad Gateway from nginx"))
    with pytest.raises(UpstreamError) as caught:
        await collect(backend(recorder).stream(task()))
    assert caught.value.status == 502
    assert "Bad Gateway from nginx" in str(caught.value)


@pytest.mark.parametrize("status", [429, 503])
async def test_busy_statuses_raise_upstream_busy(status: int) -> None:
    error = {"error": {"message": "server overloaded", "type": "ServiceUnavailable"}}
    recorder = Recorder(lambda: httpx.Response(status, json=error))
    with pytest.raises(UpstreamBusy) as caught:
        await collect(backend(recorder).stream(task()))
    assert caught.value.status == status
    assert "server overloaded" in str(caught.value)


async def test_error_event_mid_stream_after_pieces() -> None:
    error = {"error": {"object": "error", "message": "engine dead", "type": "x", "code": 500}}
    recorder = streaming(sse(chunk("one"), chunk(" two"), "data: " + json.dumps(error)))
    pieces: list[str] = []
    with pytest.raises(UpstreamError) as caught:
        await collect(backend(recorder).stream(task()), pieces)
    assert pieces == ["one", " two"]
    assert "engine dead" in str(caught.value)


async def test_llama_cpp_error_line_mid_stream() -> None:
    error = {"error": {"code": 500, "message": "context overflow", "type": "server_error"}}
    recorder = streaming(sse(chunk("one"), "error: " + json.dumps(error)))
    pieces: list[str] = []
    with pytest.raises(UpstreamError, match="context overflow"):
        await collect(backend(recorder).stream(task()), pieces)
    assert pieces == ["one"]


async def test_malformed_data_line() -> None:
    recorder = streaming(sse(chunk("ok"), 'data: {"choices": [{"delta": '))
    pieces: list[str] = []
    with pytest.raises(UpstreamError, match="malformed"):
        await collect(backend(recorder).stream(task()), pieces)
    assert pieces == ["ok"]


async def test_transport_error_has_no_status() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(UpstreamError) as caught:
        await collect(backend(refuse).stream(task()))
    assert caught.value.status is None
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


async def test_aclose_after_first_piece_closes_upstream() -> None:
    upstream = ClosableStream(sse(chunk("first")))
    recorder = Recorder(lambda: httpx.Response(200, stream=upstream))
    stream = backend(recorder).stream(task())
    assert isinstance(stream, AsyncGenerator)
    assert await anext(stream) == "first"
    assert not upstream.closed.is_set()
    await stream.aclose()
    assert upstream.closed.is_set()


async def test_cancelling_consumer_closes_upstream() -> None:
    upstream = ClosableStream(sse(chunk("first")))
    recorder = Recorder(lambda: httpx.Response(200, stream=upstream))
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in backend(recorder).stream(task()):
            got_first.set()

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 5)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert upstream.closed.is_set()


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3-8B"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3-8B"} 7.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3-8B"} 1.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3-8B"} 0.42
"""

SGLANG_METRICS = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen",tp_rank="0"} 4.0 1718000000000
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="qwen",tp_rank="0"} 9.0 1718000000000
sglang:gen_throughput{model_name="qwen",tp_rank="0"} 812.5
"""

TRICKY_LABELS = """\
vllm:num_requests_running{model_name="my model {v2}",note="say \\"hi\\" } there"} 5
vllm:num_requests_running {model_name="other model"} 1e0
vllm:num_requests_waiting{model_name="my model {v2}", note="a, b"} 2.5
vllm:num_requests_waiting{model_name="broken"} NaN
"""

NEITHER = """\
# HELP process_cpu_seconds_total Total user and system CPU time.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
python_info{implementation="CPython",version="3.11.9"} 1.0
"""


def metrics_client(status: int, text: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.MockTransport(lambda _request: httpx.Response(status, text=text))
    )


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (VLLM_METRICS, (5.0, 8.0)),
        (SGLANG_METRICS, (4.0, 9.0)),
        (TRICKY_LABELS, (6.0, 2.5)),
        (NEITHER, None),
    ],
    ids=["vllm", "sglang", "labels-with-spaces", "neither"],
)
async def test_scrape_load(page: str, expected: tuple[float, float] | None) -> None:
    async with metrics_client(200, page) as client:
        assert await scrape_load(client, "http://upstream.test/metrics") == expected


async def test_scrape_load_http_500_is_none() -> None:
    async with metrics_client(500, VLLM_METRICS) as client:
        assert await scrape_load(client, "http://upstream.test/metrics") is None


async def test_scrape_load_transport_error_is_none() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        assert await scrape_load(client, "http://upstream.test/metrics") is None
