"""OpenAIBackend, its HTTP client and the engine probes against a real local HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest

from llooma.host.engines import EngineProbe, engine_id, parse_load
from llooma.host.http import HttpPool
from llooma.host.openai_backend import (
    GenerationDefaults,
    OpenAIBackend,
    Outcome,
    Reasoning,
    Scored,
    ToolCalls,
    UpstreamBusy,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnreachable,
)
from llooma.v1.common_pb2 import (
    TASK_KIND_EMBEDDING,
    TASK_KIND_TEXT_COMPLETION,
    ChatMessage,
    GenerationParams,
)
from llooma.v1.host_pb2 import HostTask
from tests.support.fake_engine import (
    DONE,
    FakeEngine,
    Handler,
    Out,
    Request,
    delta,
    event,
    stream_events,
    usage,
)

DEFAULTS = GenerationDefaults(max_tokens=128, temperature=0.5, top_p=None)


def task(params: GenerationParams | None = None, *, prefill: str | None = None) -> HostTask:
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Hi there"),
    ]
    if prefill is not None:
        messages.append(ChatMessage(role="assistant", content=prefill))
    return HostTask(attempt_id="a1", model="llama-3-8b", messages=messages, params=params)


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    async with FakeEngine() as running:
        yield running


def backend(
    engine: FakeEngine,
    *,
    api_key: str | None = None,
    defaults: GenerationDefaults = DEFAULTS,
    kind: str = "llama.cpp",
    max_connections: int = 4,
    read_timeout_s: float = 300.0,
) -> OpenAIBackend:
    return OpenAIBackend(
        engine.base_url,
        api_key,
        "meta-llama/Llama-3-8B",
        defaults=defaults,
        engine=kind,
        max_connections=max_connections,
        read_timeout_s=read_timeout_s,
    )


async def collect(
    source: OpenAIBackend, request: HostTask, outcome: Outcome | None = None
) -> list[str]:
    return [piece async for piece in source.stream(request, outcome)]


def scripted(*events: bytes) -> Handler:
    async def handler(_request: Request, out: Out) -> None:
        await stream_events(out, *events)

    return handler


def refusing(status: int, body: object) -> Handler:
    async def handler(_request: Request, out: Out) -> None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        await out.whole(status, data)

    return handler


async def test_streams_deltas_with_the_engines_usage(engine: FakeEngine) -> None:
    source = backend(engine, api_key="sk-test")
    outcome = Outcome()
    assert await collect(source, task(), outcome) == ["Hello", " world"]
    assert outcome == Outcome("stop", 21, 2, reported=True)
    request = engine.requests[0]
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["accept-encoding"] == "identity"
    assert request.json()["stream_options"] == {"include_usage": True}
    await source.aclose()


async def test_without_usage_the_outcome_says_it_is_not_the_engines(engine: FakeEngine) -> None:
    engine.handler = scripted(delta("a"), delta("b"), delta("c", finish="length"), DONE)
    outcome = Outcome()
    assert await collect(backend(engine), task(), outcome) == ["a", "b", "c"]
    assert outcome.finish_reason == "length"
    assert outcome.output_tokens == 3
    assert not outcome.reported


async def test_usage_with_the_last_choice_and_text_after_a_stop(engine: FakeEngine) -> None:
    # Older llama.cpp: usage rides on the chunk with the finish_reason; no [DONE] at all.
    last = {
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 45, "completion_tokens": 24},
    }
    engine.handler = scripted(delta("x"), event(last))
    outcome = Outcome()
    assert await collect(backend(engine), task(), outcome) == ["x"]
    assert outcome == Outcome("stop", 45, 24, reported=True)


async def test_reasoning_is_relayed_apart_from_the_answer(engine: FakeEngine) -> None:
    named_reasoning = event({"choices": [{"index": 0, "delta": {"reasoning": "hmm"}}]})
    engine.handler = scripted(
        delta(reasoning="Let me think."), named_reasoning, delta("42", finish="stop"), DONE
    )
    pieces = await collect(backend(engine), task())
    assert pieces == ["Let me think.", "hmm", "42"]
    assert [type(piece) for piece in pieces] == [Reasoning, Reasoning, str]


async def test_body_uses_defaults_when_params_unset(engine: FakeEngine) -> None:
    await collect(backend(engine), task())
    assert engine.requests[0].json() == {
        "model": "meta-llama/Llama-3-8B",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 128,
        "temperature": 0.5,
    }


async def test_zero_is_zero_and_every_set_param_is_passed(engine: FakeEngine) -> None:
    params = GenerationParams(
        max_tokens=16,
        temperature=0.0,
        top_p=0.0,
        seed=0,
        presence_penalty=0.0,
        frequency_penalty=0.7,
        stop=["\n\n", "END"],
    )
    defaults = GenerationDefaults(max_tokens=128, temperature=0.5, top_p=0.95)
    await collect(backend(engine, defaults=defaults), task(params))
    body = engine.requests[0].json()
    assert body["max_tokens"] == 16
    assert body["temperature"] == 0
    assert body["top_p"] == 0
    assert body["seed"] == 0
    assert body["presence_penalty"] == 0
    # Proto float32 noise is rounded away, so this compares exactly.
    assert body["frequency_penalty"] == 0.7
    assert body["stop"] == ["\n\n", "END"]


async def test_body_mixes_params_and_defaults(engine: FakeEngine) -> None:
    defaults = GenerationDefaults(max_tokens=64, temperature=None, top_p=0.8)
    await collect(backend(engine, defaults=defaults), task(GenerationParams(top_p=0.5)))
    body = engine.requests[0].json()
    assert body["max_tokens"] == 64
    assert body["top_p"] == 0.5
    for absent in ("temperature", "stop", "seed", "presence_penalty", "frequency_penalty"):
        assert absent not in body


async def test_trailing_assistant_message_is_continued(engine: FakeEngine) -> None:
    # llama.cpp continues a trailing assistant message as it is, whitespace included.
    await collect(backend(engine), task(prefill="The village "))
    body = engine.requests[0].json()
    assert body["messages"][-1] == {"role": "assistant", "content": "The village "}
    assert "continue_final_message" not in body
    # vLLM needs to be told.
    await collect(backend(engine, kind="vllm"), task(prefill="The village "))
    body = engine.requests[1].json()
    assert body["messages"][-1] == {"role": "assistant", "content": "The village "}
    assert body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False
    await collect(backend(engine, kind="vllm"), task())
    assert "continue_final_message" not in engine.requests[2].json()


LLAMA_CPP_OVERFLOW = {
    "error": {
        "code": 400,
        "message": "request (4476 tokens) exceeds the available context size (2048 tokens), "
        "try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 4476,
        "n_ctx": 2048,
    }
}
OPENAI_OVERFLOW = {
    "error": {
        "message": "This model's maximum context length is 8192 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
VLLM_OVERFLOW = {
    "object": "error",
    "message": "This model's maximum context length is 2048 tokens. However, you requested "
    "4000 tokens (3000 in the messages, 1000 in the completion).",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}
VLLM_BAD_PARAM = {
    "error": {"message": "temperature must be non-negative", "type": "BadRequestError", "code": 400}
}


@pytest.mark.parametrize(
    ("status", "body", "code", "words"),
    [
        (400, LLAMA_CPP_OVERFLOW, "context_length_exceeded", "exceeds the available context"),
        (400, OPENAI_OVERFLOW, "context_length_exceeded", "maximum context length"),
        (400, VLLM_OVERFLOW, "context_length_exceeded", "maximum context length"),
        (422, VLLM_BAD_PARAM, "", "temperature must be non-negative"),
        (413, b"Payload Too Large", "", "Payload Too Large"),
    ],
    ids=["llama.cpp", "openai", "vllm", "422", "413-plain"],
)
async def test_engine_refusal_is_the_clients_error(
    engine: FakeEngine, status: int, body: object, code: str, words: str
) -> None:
    engine.handler = refusing(status, body)
    with pytest.raises(UpstreamRejected) as caught:
        await collect(backend(engine), task())
    assert caught.value.status == status
    assert caught.value.client_code == code
    assert words in caught.value.message


@pytest.mark.parametrize("status", [401, 404, 500, 502])
async def test_other_statuses_are_the_hosts_failure(engine: FakeEngine, status: int) -> None:
    error = {"error": {"message": "model 'x' not found", "type": "NotFoundError", "code": status}}
    engine.handler = refusing(status, error)
    with pytest.raises(UpstreamError) as caught:
        await collect(backend(engine), task())
    assert not isinstance(caught.value, UpstreamRejected | UpstreamBusy)
    assert caught.value.status == status
    assert "model 'x' not found" in str(caught.value)


async def test_error_message_is_truncated(engine: FakeEngine) -> None:
    engine.handler = refusing(400, {"error": {"message": "x" * 5000}})
    with pytest.raises(UpstreamRejected) as caught:
        await collect(backend(engine), task())
    assert "x" * 200 in caught.value.message
    assert len(caught.value.message) < 400


@pytest.mark.parametrize("status", [429, 503])
async def test_busy_statuses_raise_upstream_busy(engine: FakeEngine, status: int) -> None:
    engine.handler = refusing(status, {"error": {"message": "server overloaded"}})
    with pytest.raises(UpstreamBusy) as caught:
        await collect(backend(engine), task())
    assert caught.value.status == status
    assert "server overloaded" in str(caught.value)


async def test_error_event_mid_stream_after_pieces(engine: FakeEngine) -> None:
    error = {"error": {"object": "error", "message": "engine dead", "type": "x", "code": 500}}
    engine.handler = scripted(delta("one"), delta(" two"), event(error))
    pieces: list[str] = []

    async def read() -> None:
        async for piece in backend(engine).stream(task()):
            pieces.append(piece)

    with pytest.raises(UpstreamError, match="engine dead"):
        await read()
    assert pieces == ["one", " two"]


async def test_llama_cpp_error_line_before_any_piece_is_a_refusal(engine: FakeEngine) -> None:
    engine.handler = scripted(b"error: " + orjson.dumps(LLAMA_CPP_OVERFLOW) + b"\n\n")
    with pytest.raises(UpstreamRejected) as caught:
        await collect(backend(engine), task())
    assert caught.value.client_code == "context_length_exceeded"


async def test_malformed_data_line(engine: FakeEngine) -> None:
    engine.handler = scripted(delta("ok"), b'data: {"choices": [{"delta": \n\n')
    with pytest.raises(UpstreamError, match="malformed"):
        await collect(backend(engine), task())


async def test_events_split_across_chunks(engine: FakeEngine) -> None:
    whole = delta("Hel") + delta("lo") + usage(3, 2) + DONE
    engine.handler = scripted(*(whole[i : i + 7] for i in range(0, len(whole), 7)))
    outcome = Outcome()
    assert await collect(backend(engine), task(), outcome) == ["Hel", "lo"]
    assert outcome.reported


async def test_connection_refused_is_unreachable() -> None:
    stopped = await FakeEngine().start()
    await stopped.stop()
    source = backend(stopped)
    with pytest.raises(UpstreamUnreachable):
        await collect(source, task())
    assert source.pool.open_connections == 0


async def test_keep_alive_reuses_one_connection(engine: FakeEngine) -> None:
    source = backend(engine)
    for _ in range(5):
        assert await collect(source, task()) == ["Hello", " world"]
    assert engine.connections_accepted == 1
    assert source.pool.idle_connections == 1


async def test_a_server_that_closes_after_streams_is_learned_and_never_written_to_closed(
    engine: FakeEngine,
) -> None:
    # As llama-server does: it announces nothing, and closes after each streamed response.
    engine.close_after_response = True
    source = backend(engine)
    pool = source.pool
    retried_when_learned: int | None = None
    for _ in range(20):
        # Back to back, as a host serves one task after another.
        assert await collect(source, task()) == ["Hello", " world"]
        if pool.closes_after_stream and retried_when_learned is None:
            retried_when_learned = pool.stats.retried
    # The first close is how it is learned (at most one request sent again); after that no
    # request is written into a socket the server closed, and each gets a connection opened
    # ahead of time.
    assert retried_when_learned is not None
    assert retried_when_learned <= 1
    assert pool.stats.retried == retried_when_learned
    assert pool.stats.spares_used >= 17
    assert len(engine.requests) == 20
    # One spare at most beyond the requests' own connections, and none left when closed.
    assert engine.connections_accepted <= 20 + pool.stats.retried + 1
    await source.aclose()
    assert await engine.wait_connections(at_most=0) == 0


async def test_a_close_the_loop_has_not_read_yet_is_seen_before_reuse() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        pool = HttpPool(f"http://127.0.0.1:{server.getsockname()[1]}", max_connections=1)
        connection = await pool._connect()
        accepted, _ = server.accept()
        assert connection.reusable()
        accepted.close()
        # No await since the close: the event loop has not read it, the socket shows it.
        assert connection.alive()
        assert not connection.reusable()
        await pool.aclose()


async def test_a_server_that_keeps_connections_gets_no_spares(engine: FakeEngine) -> None:
    source = backend(engine)
    for _ in range(20):
        assert await collect(source, task()) == ["Hello", " world"]
    pool = source.pool
    assert not pool.closes_after_stream
    assert (pool.stats.retried, pool.stats.spares_opened, engine.connections_accepted) == (0, 0, 1)
    await source.aclose()


async def test_read_timeout_fails_a_stalled_stream(engine: FakeEngine) -> None:
    async def stall(_request: Request, out: Out) -> None:
        await out.head(200, {"Content-Type": "text/event-stream"})
        await out.chunk(delta("first"))
        await asyncio.Event().wait()

    engine.handler = stall
    source = backend(engine, read_timeout_s=0.3)
    with pytest.raises(UpstreamError, match="transport"):
        await asyncio.wait_for(collect(source, task()), 5)
    assert await engine.wait_connections(0) == 0


# Cancellation at every phase: the connection is released (closed, so the engine notices)
# and the pool's slot is free again.


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose listen queue is full: a connect to it hangs (SYNs are dropped)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port: int = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    server.close()


async def test_cancel_while_connecting_frees_the_slot(unanswered_port: int) -> None:
    source = OpenAIBackend(
        f"http://127.0.0.1:{unanswered_port}/v1", None, "m", defaults=DEFAULTS, max_connections=1
    )
    for _ in range(3):
        attempt = asyncio.create_task(collect(source, task()))
        await asyncio.sleep(0.1)
        attempt.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attempt
        assert source.pool.open_connections == 0
        assert not source.pool._slots.locked()


async def test_connect_timeout(unanswered_port: int) -> None:
    source = OpenAIBackend(
        f"http://127.0.0.1:{unanswered_port}/v1",
        None,
        "m",
        defaults=DEFAULTS,
        connect_timeout_s=0.2,
    )
    with pytest.raises(UpstreamUnreachable, match="timed out"):
        await collect(source, task())


@pytest.mark.parametrize("phase", ["headers", "mid-stream"])
async def test_cancel_releases_the_connection(engine: FakeEngine, phase: str) -> None:
    reached = asyncio.Event()

    async def hold(_request: Request, out: Out) -> None:
        if phase == "mid-stream":
            await out.head(200, {"Content-Type": "text/event-stream"})
            await out.chunk(delta("first"))
        reached.set()
        await asyncio.Event().wait()

    engine.handler = hold
    source = backend(engine, max_connections=1)
    attempt = asyncio.create_task(collect(source, task()))
    await asyncio.wait_for(reached.wait(), 5)
    await asyncio.sleep(0.02)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    assert source.pool.open_connections == 0
    assert await engine.wait_connections(0) == 0
    assert engine.abandoned == 1
    engine.handler = scripted(delta("again"), DONE)
    assert await collect(source, task()) == ["again"]


async def test_connections_are_bounded(engine: FakeEngine) -> None:
    release = asyncio.Event()

    async def slow(_request: Request, out: Out) -> None:
        await release.wait()
        await stream_events(out, delta("x"), DONE)

    engine.handler = slow
    source = backend(engine, max_connections=2)
    attempts = [asyncio.create_task(collect(source, task())) for _ in range(6)]
    for _ in range(500):
        if len(engine.requests) >= 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert engine.open_connections == 2
    assert len(engine.requests) == 2
    release.set()
    assert await asyncio.gather(*attempts) == [["x"]] * 6
    assert engine.peak_connections == 2


async def test_cancelled_races_leave_the_pool_flat(engine: FakeEngine) -> None:
    """Races at width 2: the loser is cancelled at a random moment (connecting, waiting for
    headers, mid-stream); connections stay bounded and the backend still answers."""

    async def tokens(_request: Request, out: Out) -> None:
        await out.head(200, {"Content-Type": "text/event-stream"})
        for piece in ("a", "b", "c", "d"):
            await asyncio.sleep(0.001)
            await out.chunk(delta(piece))
        await out.chunk(usage(5, 4) + DONE)
        await out.end()

    engine.handler = tokens
    source = backend(engine, max_connections=4)
    rng = random.Random(7)
    for _ in range(150):
        winner = asyncio.create_task(collect(source, task()))
        loser = asyncio.create_task(collect(source, task()))
        await asyncio.sleep(rng.choice((0, 0, 0.0005, 0.002, 0.004)))
        loser.cancel()
        await winner
        with pytest.raises(asyncio.CancelledError):
            await loser
    assert source.pool.open_connections <= 4
    assert engine.peak_connections <= 4
    assert await engine.wait_connections(source.pool.idle_connections) <= 4
    assert await collect(source, task()) == ["a", "b", "c", "d"]


async def test_https_origin_parses() -> None:
    pool = HttpPool("https://api.example.com/v1", max_connections=1)
    assert (pool.origin.port, pool.origin.prefix, pool.origin.authority) == (
        443,
        "/v1",
        "api.example.com",
    )


# Engine ids, load and health.


def test_engine_id_is_shared_by_one_engine() -> None:
    assert engine_id("http://127.0.0.1:8080/v1") == engine_id("http://127.0.0.1:8080/v1/")
    assert engine_id("http://LOCALHOST:80/v1") == engine_id("http://localhost/v1")
    assert engine_id("http://127.0.0.1:8080/v1") != engine_id("http://127.0.0.1:8081/v1")


LLAMA_CPP_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1234
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 4
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 2
"""

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3-8B"} 3.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3-8B"} 2.0
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3-8B"} 7.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3-8B"} 1.0
vllm:gpu_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3-8B"} 0.42
"""

SGLANG_METRICS = """\
sglang:num_running_reqs{model_name="qwen",tp_rank="0"} 4.0 1718000000000
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
process_cpu_seconds_total 12.5
python_info{implementation="CPython",version="3.11.9"} 1.0
"""


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (LLAMA_CPP_METRICS, (4.0, 2.0)),
        (VLLM_METRICS, (5.0, 8.0)),
        (SGLANG_METRICS, (4.0, 9.0)),
        (TRICKY_LABELS, (6.0, 2.5)),
        (NEITHER, None),
    ],
    ids=["llama.cpp", "vllm", "sglang", "labels-with-spaces", "neither"],
)
def test_parse_load(page: str, expected: tuple[float, float] | None) -> None:
    assert parse_load(page) == expected


def pages(routes: dict[str, tuple[int, bytes]]) -> Handler:
    async def handler(request: Request, out: Out) -> None:
        status, body = routes.get(request.path, (404, b"not found"))
        await out.whole(status, body, "text/plain")

    return handler


SLOTS = orjson.dumps([{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}])


@pytest.mark.parametrize(
    ("kind", "routes", "expected"),
    [
        ("llama.cpp", {"/metrics": (200, LLAMA_CPP_METRICS.encode())}, (True, 4, 2, True)),
        # --metrics off: llama-server answers 501, then /slots tells which slots are busy.
        ("llama.cpp", {"/metrics": (501, b""), "/slots": (200, SLOTS)}, (True, 1, 0, True)),
        (
            "llama.cpp",
            {"/metrics": (501, b""), "/slots": (501, b""), "/health": (200, b"")},
            (True, 0, 0, False),
        ),
        # Loading its model: not ready to serve.
        (
            "llama.cpp",
            {"/metrics": (501, b""), "/slots": (501, b""), "/health": (503, b"")},
            (False, 0, 0, False),
        ),
        ("vllm", {"/metrics": (200, VLLM_METRICS.encode())}, (True, 5, 8, True)),
        ("sglang", {"/health": (200, b"")}, (True, 0, 0, False)),
        ("ollama", {"/api/ps": (200, b'{"models": []}')}, (True, 0, 0, False)),
        ("ollama", {"/api/version": (200, b'{"version": "0.9.0"}')}, (True, 0, 0, False)),
        ("openai", {"/v1/models": (200, b'{"data": []}')}, (True, 0, 0, False)),
        ("openai", {"/v1/models": (500, b"")}, (False, 0, 0, False)),
    ],
    ids=[
        "llama.cpp-metrics",
        "llama.cpp-slots",
        "llama.cpp-health",
        "llama.cpp-loading",
        "vllm",
        "sglang-health",
        "ollama-ps",
        "ollama-version",
        "openai",
        "openai-500",
    ],
)
async def test_probe(
    engine: FakeEngine,
    kind: str,
    routes: dict[str, tuple[int, bytes]],
    expected: tuple[bool, int, int, bool],
) -> None:
    engine.handler = pages(routes)
    probe = EngineProbe(kind, engine.base_url, timeout_s=1.0)
    for _ in range(2):
        state = await probe.probe()
        assert (state.reachable, state.running, state.waiting, state.reported) == expected
    await probe.aclose()


async def test_probe_of_a_stopped_or_hung_engine(engine: FakeEngine) -> None:
    hang = asyncio.Event()

    async def hung(_request: Request, out: Out) -> None:
        await hang.wait()

    engine.handler = hung
    probe = EngineProbe("llama.cpp", engine.base_url, timeout_s=0.2)
    assert not (await probe.probe()).reachable
    await engine.stop()
    assert not (await probe.probe()).reachable
    await probe.aclose()


async def test_probe_with_a_metrics_url(engine: FakeEngine) -> None:
    engine.handler = pages({"/custom/metrics": (200, VLLM_METRICS.encode())})
    probe = EngineProbe("openai", engine.base_url, metrics_url=f"{engine.root_url}/custom/metrics")
    state = await probe.probe()
    assert (state.reachable, state.running, state.waiting) == (True, 5, 8)
    await probe.aclose()


async def test_idle_connections_expire(engine: FakeEngine) -> None:
    pool = HttpPool(engine.base_url, max_connections=4, idle_expiry_s=0.1)

    async def get() -> None:
        async with pool.request("GET", "/models") as response:
            await response.read(1000)

    await asyncio.gather(*(get() for _ in range(3)))
    assert pool.open_connections == 3
    await asyncio.sleep(0.15)
    await get()
    assert pool.open_connections == 1
    assert await engine.wait_connections(1) == 1
    await pool.aclose()
    assert await engine.wait_connections(0) == 0


async def test_a_server_refusing_stream_options_is_asked_without(engine: FakeEngine) -> None:
    async def strict(request: Request, out: Out) -> None:
        if "stream_options" in request.json():
            error = {"error": {"message": "Unrecognized request argument: stream_options"}}
            await out.whole(400, orjson.dumps(error))
        else:
            await stream_events(out, delta("ok", finish="stop"), DONE)

    engine.handler = strict
    source = backend(engine)
    for _ in range(2):
        outcome = Outcome()
        assert await collect(source, task(), outcome) == ["ok"]
        assert not outcome.reported
    assert len(engine.requests) == 3


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        # llama.cpp with a Jinja template: the answer starts with the prefix again.
        (["The village ", "stood", " still"], ["stood", " still"]),
        (["The vil", "lage stood", " still"], ["stood", " still"]),
        (["The village stood", " still"], ["stood", " still"]),
        # vLLM and others: only the new text.
        (["stood", " still"], ["stood", " still"]),
        (["The", " end"], ["The end"]),
        # The stream ends inside what looked like the prefix: it was the answer.
        (["The vil"], ["The vil"]),
    ],
    ids=["echo-whole", "echo-split", "echo-and-more", "no-echo", "diverges", "ends-inside"],
)
async def test_an_echoed_prefill_is_not_sent_twice(
    engine: FakeEngine, deltas: list[str], expected: list[str]
) -> None:
    engine.handler = scripted(*(delta(d) for d in deltas), DONE)
    assert await collect(backend(engine), task(prefill="The village ")) == expected


async def test_a_slow_load_endpoint_falls_back_to_health(engine: FakeEngine) -> None:
    slow = asyncio.Event()

    async def busy_engine(request: Request, out: Out) -> None:
        if request.path == "/metrics":
            if slow.is_set():
                await asyncio.Event().wait()  # waits for the engine's next batch
            await out.whole(200, LLAMA_CPP_METRICS.encode(), "text/plain")
        elif request.path == "/health":
            await out.whole(200, b'{"status": "ok"}')

    engine.handler = busy_engine
    probe = EngineProbe("llama.cpp", engine.base_url, timeout_s=0.5)
    assert (await probe.probe()).running == 4
    slow.set()
    state = await probe.probe()
    # Reachable, with the last load seen.
    assert (state.reachable, state.running, state.waiting) == (True, 4, 2)
    await probe.aclose()


async def test_a_text_completion_continues_its_raw_prompt(engine: FakeEngine) -> None:
    async def complete(request: Request, out: Out) -> None:
        await stream_events(
            out,
            event({"choices": [{"index": 0, "text": " upon", "finish_reason": None}]}),
            event({"choices": [{"index": 0, "text": " a time", "finish_reason": "stop"}]}),
            usage(3, 3),
            DONE,
        )

    engine.handler = complete
    handed_over = HostTask(
        attempt_id="a2",
        model="m",
        messages=[
            ChatMessage(role="user", content="Once"),
            ChatMessage(role="assistant", content=" upon"),
        ],
        params=GenerationParams(max_tokens=4),
        kind=TASK_KIND_TEXT_COMPLETION,
    )
    outcome = Outcome()
    pieces = await collect(backend(engine), handed_over, outcome)
    assert pieces == [" upon", " a time"]
    assert (outcome.input_tokens, outcome.output_tokens, outcome.finish_reason) == (3, 3, "stop")
    (sent,) = engine.requests
    assert sent.path == "/v1/completions"
    body = sent.json()
    # The text so far joins the prompt; no chat messages, no chat template.
    assert body["prompt"] == "Once upon"
    assert "messages" not in body
    assert "continue_final_message" not in body


async def test_embeddings_come_back_as_little_endian_float32(engine: FakeEngine) -> None:
    async def embed(request: Request, out: Out) -> None:
        data = [
            {"index": 1, "embedding": [0.25, -1.0]},
            {"index": 0, "embedding": [1.5, 2.0]},
        ]
        await out.whole(200, orjson.dumps({"data": data, "usage": {"prompt_tokens": 9}}))

    engine.handler = embed
    inputs = HostTask(
        attempt_id="a3",
        model="m",
        messages=[ChatMessage(role="user", content="a"), ChatMessage(role="user", content="b")],
        kind=TASK_KIND_EMBEDDING,
    )
    outcome = Outcome()
    vectors = await backend(engine).embed(inputs, outcome)
    assert vectors == [struct.pack("<2f", 1.5, 2.0), struct.pack("<2f", 0.25, -1.0)]
    assert (outcome.input_tokens, outcome.output_tokens, outcome.reported) == (9, 0, True)
    (sent,) = engine.requests
    assert sent.path == "/v1/embeddings"
    assert sent.json()["input"] == ["a", "b"]

    async def too_few(request: Request, out: Out) -> None:
        await out.whole(200, orjson.dumps({"data": [{"index": 0, "embedding": [1.0]}]}))

    engine.handler = too_few
    with pytest.raises(UpstreamError, match="1 vectors for 2 inputs"):
        await backend(engine).embed(inputs, Outcome())


async def test_tools_response_format_and_logprobs_reach_the_engine_as_sent(
    engine: FakeEngine,
) -> None:
    tools = '[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]'
    params = GenerationParams(
        tools_json=tools,
        tool_choice_json='"required"',
        parallel_tool_calls=False,
        response_format_json='{"type":"json_object"}',
        logprobs=True,
        top_logprobs=0,
    )
    request = task(params)
    call = '[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]'
    request.messages.extend(
        [
            ChatMessage(role="assistant", tool_calls_json=call),
            ChatMessage(role="tool", content="done", tool_call_id="c1"),
        ]
    )
    await collect(backend(engine), request)
    body = engine.requests[0].json()
    assert body["tools"] == orjson.loads(tools)
    assert body["tool_choice"] == "required"
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_object"}
    assert (body["logprobs"], body["top_logprobs"]) == (True, 0)
    assert body["messages"][-2:] == [
        {"role": "assistant", "content": None, "tool_calls": orjson.loads(call)},
        {"role": "tool", "content": "done", "tool_call_id": "c1"},
    ]


async def test_tool_call_deltas_and_logprobs_come_out_as_their_own_pieces(
    engine: FakeEngine,
) -> None:
    fragment = [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f"}}]
    entry = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}
    engine.handler = scripted(
        event(
            {
                "choices": [
                    {"index": 0, "delta": {"content": "Hi"}, "logprobs": {"content": [entry]}}
                ]
            }
        ),
        event({"choices": [{"index": 0, "delta": {"tool_calls": fragment}}]}),
        delta(None, finish="tool_calls"),
        DONE,
    )
    outcome = Outcome()
    pieces = await collect(backend(engine), task(), outcome)
    assert [piece.__class__ for piece in pieces] == [Scored, ToolCalls]
    assert pieces[0] == "Hi"
    scored = pieces[0]
    assert isinstance(scored, Scored)
    assert orjson.loads("[" + scored.logprobs + "]") == [entry]
    assert orjson.loads(str(pieces[1])) == fragment
    assert outcome.finish_reason == "tool_calls"
