"""The HTTP API end to end on the running stack: real NATS, protobuf, Postgres, hosts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from starlette.applications import Starlette

from llooma import bus, subjects
from llooma.embedded import EmbeddedNats
from llooma.membership import HostDirectory, ServiceDirectory
from llooma.settings import DEV_API_KEY, ORCHESTRATED_MODEL, Settings
from llooma.stack import Stack
from llooma.v1.common_pb2 import ERROR_CODE_HOST_FAILED, ErrorDetail, Usage
from llooma.v1.host_pb2 import HostAccepted, HostChunk, HostFinished, HostTask, HostToken
from llooma.v1.pipeline_pb2 import ChatRequest, ClientDelta, ClientEvent, ClientStarted
from services.ingress.api import Ingress
from services.ingress.main import ROUTES as INGRESS_ROUTES
from services.ingress.replies import ReplyRouter
from tests.conftest import AUTH
from tests.support.scripted_host import Reply, ScriptedHost

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"

UNICODE_PROMPT = "Grüße, 世界!  Two  spaces,\ttabs\nand a new line — with emoji 🦙 at the end."


def chat(model: str, content: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def test_openai_client_streams_what_the_echo_host_received(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY)
    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": UNICODE_PROMPT}], stream=True
    )
    pieces = []
    finish_reasons = []
    async for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish_reasons.append(choice.finish_reason)
    assert "".join(pieces) == UNICODE_PROMPT
    assert finish_reasons[-1] == "stop"
    assert len([p for p in pieces if p]) > 5, "echo streams token by token, not in one piece"
    await client.close()


async def test_openai_client_non_streaming_reports_usage(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY)
    completion = await client.chat.completions.create(
        model="synthetic-small",
        messages=[{"role": "user", "content": "Tell me about racing hosts."}],
        max_tokens=7,
    )
    assert completion.object == "chat.completion"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7
    assert completion.choices[0].finish_reason == "length"
    content = completion.choices[0].message.content
    assert content is not None
    assert len(content.split()) == 7
    await client.close()


async def test_sse_wire_format_and_headers(http: httpx.AsyncClient) -> None:
    body = chat("llooma", "Hello there, network.", stream=True, max_tokens=4)
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-llooma-path"] == "direct"
        request_id = response.headers["x-llooma-request-id"]
        assert response.headers["x-request-id"] == request_id
        lines = [line async for line in response.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [orjson.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert all(e["id"] == f"chatcmpl-{request_id}" for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert len(text.split()) == 4


async def test_models_lists_orchestrated_and_served_models(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/models", headers=AUTH)
    assert response.status_code == 200
    ids = [m["id"] for m in response.json()["data"]]
    assert ids[0] == "llooma"
    assert {"synthetic-small", "echo"} <= set(ids)


async def test_healthz_reports_every_service(http: httpx.AsyncClient) -> None:
    response = await http.get("/healthz")
    assert response.status_code == 200
    report = response.json()
    assert set(report["services"]) == {p.name for p in SERVICES_DIR.iterdir() if p.is_dir()} - {
        "__pycache__"
    }
    assert all(count >= 1 for count in report["services"].values())
    assert report["hosts"] >= 3


async def test_settlement_row_reaches_postgres(http: httpx.AsyncClient, database_url: str) -> None:
    response = await http.post(
        "/v1/chat/completions",
        json=chat("synthetic-small", "Settle me", max_tokens=3),
        headers=AUTH,
    )
    assert response.status_code == 200
    request_id = response.headers["x-llooma-request-id"]
    conn = await asyncpg.connect(database_url)
    try:
        rows = []
        # Accounting settles in batches off the request path; a busy suite may delay one.
        for _ in range(300):
            rows = await conn.fetch(
                "SELECT host_id, outcome, output_tokens FROM task_settlements WHERE request_id=$1",
                request_id,
            )
            if any(r["outcome"] == "won" for r in rows):
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    winners = [r for r in rows if r["outcome"] == "won"]
    assert len(winners) == 1, rows
    assert winners[0]["output_tokens"] == 3


# -- errors ------------------------------------------------------------------------------------


def assert_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)


@pytest.mark.parametrize(
    ("headers", "case"),
    [
        ({}, "missing"),
        ({"Authorization": "Bearer sk-wrong"}, "wrong"),
        ({"Authorization": "Basic x"}, "scheme"),
    ],
)
async def test_unauthorized(http: httpx.AsyncClient, headers: dict[str, str], case: str) -> None:
    response = await http.post("/v1/chat/completions", json=chat("echo", "hi"), headers=headers)
    assert_openai_error(response, 401, "invalid_api_key")
    models = await http.get("/v1/models", headers=headers)
    assert models.status_code == 401, case


@pytest.mark.parametrize(
    ("content", "expected_in_message"),
    [
        (b'{"model": "echo", "messages": [', "malformed JSON"),
        (b"not json at all", "malformed JSON"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "echo"}', "messages"),
        (b'{"model": "echo", "messages": []}', "messages"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "echo", "messages": [{"role": "user", "content": 5}]}', "messages.0.content"),
        (b'{"model": "echo", "messages": [{"role": "robot", "content": "x"}]}', "messages.0.role"),
        (
            b'{"model": "echo", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}',
            "stream",
        ),
        (
            b'{"model": "echo", "max_tokens": "5", "messages": [{"role": "user", "content": "x"}]}',
            "max_tokens",
        ),
        (
            b'{"model": "echo", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}',
            "max_tokens",
        ),
        (
            b'{"model": "echo", "temperature": 9, "messages": [{"role": "user", "content": "x"}]}',
            "temperature",
        ),
        (b"[1, 2, 3]", "body"),
        (b'{"model": "echo", "messages": [{"role": "user", "content": null}]}', "needs content"),
        (b'{"model": "echo", "messages": [{"role": "system"}]}', "needs content"),
        (
            b'{"model": "echo", "stop": ["a", "b", "c", "d", "e"],'
            b' "messages": [{"role": "user", "content": "x"}]}',
            "at most 4 stop sequences",
        ),
        (
            b'{"model": "echo", "temperature": NaN,'
            b' "messages": [{"role": "user", "content": "x"}]}',
            "finite number",
        ),
        (
            b'{"model": "echo", "top_p": Infinity, "messages": [{"role": "user", "content": "x"}]}',
            "finite number",
        ),
    ],
)
async def test_bad_request_bodies(
    http: httpx.AsyncClient, content: bytes, expected_in_message: str
) -> None:
    response = await http.post("/v1/chat/completions", content=content, headers=AUTH)
    assert_openai_error(response, 400, "invalid_request")
    assert expected_in_message in response.json()["error"]["message"]


async def test_invalid_utf8_is_rejected(http: httpx.AsyncClient) -> None:
    content = b'{"model": "echo", "messages": [{"role": "user", "content": "caf\xe9 \xff"}]}'
    response = await http.post("/v1/chat/completions", content=content, headers=AUTH)
    assert_openai_error(response, 400, "invalid_utf8")


async def test_unknown_model_is_404(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions", json=chat(f"no-such-model-{uuid.uuid4().hex}", "hi"), headers=AUTH
    )
    assert_openai_error(response, 404, "model_not_found")


async def test_a_model_whose_hosts_left_is_503_with_retry_after_not_404(
    http: httpx.AsyncClient, nc: Client
) -> None:
    model = f"resting-{uuid.uuid4().hex[:8]}"

    async def never(_: HostTask, __: Reply) -> None:
        raise AssertionError("no task for a host that left")

    async with ScriptedHost(nc, f"host-{model}", model, never):
        await wait_for_model(http, model)
        # Every request refreshes what the ingress remembers of the models it has seen.
        never_seen = chat(f"no-such-{model}", "hi")
        response = await http.post("/v1/chat/completions", json=never_seen, headers=AUTH)
        assert_openai_error(response, 404, "model_not_found")
    for _ in range(100):
        listed = await http.get("/v1/models", headers=AUTH)
        if model not in [m["id"] for m in listed.json()["data"]]:
            break
        await asyncio.sleep(0.05)
    response = await http.post("/v1/chat/completions", json=chat(model, "hi"), headers=AUTH)
    assert_openai_error(response, 503, "no_eligible_host")
    assert int(response.headers["retry-after"]) >= 1


async def test_unknown_routes_and_methods_answer_in_openai_error_shape(
    http: httpx.AsyncClient,
) -> None:
    for path in ("/v1/nope", "/v1/chat/completion", "/nope"):
        response = await http.post(path, json={}, headers=AUTH)
        assert_openai_error(response, 404, "not_found")
        assert path in response.json()["error"]["message"]
    # The other endpoints exist: an empty body is a bad request there.
    for path in ("/v1/completions", "/v1/embeddings", "/v1/responses"):
        response = await http.post(path, json={}, headers=AUTH)
        assert_openai_error(response, 400, "invalid_request")
    response = await http.get("/v1/chat/completions", headers=AUTH)
    assert_openai_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]


async def test_models_by_id(http: httpx.AsyncClient) -> None:
    for name in ("llooma", "echo"):
        response = await http.get(f"/v1/models/{name}", headers=AUTH)
        assert response.status_code == 200
        assert response.json() == {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "llooma",
        }
    response = await http.get("/v1/models/no-such-model", headers=AUTH)
    assert_openai_error(response, 404, "model_not_found")
    assert response.json()["error"]["param"] == "model"
    assert (await http.get("/v1/models/echo")).status_code == 401


async def test_oversized_body_is_413_with_or_without_length(http: httpx.AsyncClient) -> None:
    huge = orjson.dumps(chat("echo", "x" * (1024 * 1024 + 10)))
    response = await http.post("/v1/chat/completions", content=huge, headers=AUTH)
    assert_openai_error(response, 413, "body_too_large")

    async def chunked() -> object:
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    response = await http.post("/v1/chat/completions", content=chunked(), headers=AUTH)  # type: ignore[arg-type]
    assert_openai_error(response, 413, "body_too_large")


async def test_no_eligible_host_is_503(http: httpx.AsyncClient, nc: Client) -> None:
    model = f"draining-{uuid.uuid4().hex[:8]}"

    async def never(_: HostTask, __: Reply) -> None:
        raise AssertionError("a draining host must not get tasks")

    async with ScriptedHost(nc, f"host-{model}", model, never) as host:
        await wait_for_model(http, model)
        host.draining = True
        await host.heartbeat()
        await asyncio.sleep(0.3)
        response = await http.post("/v1/chat/completions", json=chat(model, "hi"), headers=AUTH)
        assert_openai_error(response, 503, "no_eligible_host")
        assert "no eligible host" in response.json()["error"]["message"]
        assert host.received == []


async def wait_for_model(http: httpx.AsyncClient, model: str) -> None:
    for _ in range(100):
        listed = await http.get("/v1/models", headers=AUTH)
        if model in [m["id"] for m in listed.json()["data"]]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{model} never appeared in /v1/models")


async def test_failure_after_streaming_began_ends_with_error_event(
    http: httpx.AsyncClient, nc: Client, stack: Stack
) -> None:
    model = f"broken-{uuid.uuid4().hex[:8]}"

    async def fail_midway(_: HostTask, reply: Reply) -> None:
        await reply(HostChunk(seq=0, accepted=HostAccepted()))
        await reply(HostChunk(seq=1, token=HostToken(text="partial")))
        await reply(HostChunk(seq=2, token=HostToken(text=" answer")))
        await asyncio.sleep(0.05)
        await reply(
            HostChunk(failed=ErrorDetail(code=ERROR_CODE_HOST_FAILED, message="GPU fell over"))
        )

    async with ScriptedHost(nc, f"host-{model}", model, fail_midway):
        await wait_for_model(http, model)
        body = chat(model, "hi", stream=True)
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines() if line]
    assert "data: [DONE]" not in lines
    last = orjson.loads(lines[-1].removeprefix("data: "))
    assert last["error"]["code"] == "host_failed"
    assert not any(
        orjson.loads(line.removeprefix("data: ")).get("choices", [{}])[0].get("finish_reason")
        for line in lines[:-1]
    ), "a failed stream must never carry a finish_reason"

    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY)
    async with ScriptedHost(nc, f"host-{model}", model, fail_midway):
        await wait_for_model(http, model)
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    await client.close()


async def test_host_finishing_cleanly_reports_its_usage(
    http: httpx.AsyncClient, nc: Client
) -> None:
    model = f"exact-{uuid.uuid4().hex[:8]}"

    async def answer(_: HostTask, reply: Reply) -> None:
        await reply(HostChunk(seq=0, accepted=HostAccepted()))
        await reply(HostChunk(seq=1, token=HostToken(text="ok")))
        await reply(
            HostChunk(
                seq=2,
                finished=HostFinished(
                    finish_reason="stop", usage=Usage(input_tokens=11, output_tokens=1)
                ),
            )
        )

    async with ScriptedHost(nc, f"host-{model}", model, answer):
        await wait_for_model(http, model)
        response = await http.post("/v1/chat/completions", json=chat(model, "hi"), headers=AUTH)
    assert response.status_code == 200
    payload = response.json()
    assert payload["choices"][0]["message"]["content"] == "ok"
    assert payload["usage"] == {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}


# -- one ingress in this process, on a nats-server of its own, the test playing the pipeline --


@pytest.fixture(scope="module")
def lone_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats.start(tmp_path_factory.mktemp("lone-nats"), sync_always=False)
    yield server
    server.stop()


async def test_client_leaving_before_the_first_byte_frees_its_queue_and_cancels(
    lone_nats: EmbeddedNats,
) -> None:
    settings = Settings()
    nc = await bus.connect(lone_nats.url, "llooma-test-ingress")
    js = nc.jetstream()
    await bus.ensure_topology(js)
    replies = ReplyRouter("ingress-test")
    await replies.start(nc)
    hosts = HostDirectory(stale_after_s=2.0, min_version="0.1.0")
    ingress = Ingress(settings, nc, js, replies, hosts, ServiceDirectory(stale_after_s=3.0))
    app = Starlette(routes=INGRESS_ROUTES)
    app.state.ingress = ingress
    cancelled: asyncio.Queue[str] = asyncio.Queue()

    async def on_cancel(msg: Msg) -> None:
        cancelled.put_nowait(msg.subject)

    await nc.subscribe(subjects.REQUEST_CANCEL_ANY, cb=on_cancel)
    handed_off = await js.subscribe(subjects.PIPELINE_PRIVACY, durable="test-privacy")

    body = orjson.dumps(chat(ORCHESTRATED_MODEL, "hi", stream=True))
    client_left = asyncio.Event()
    sent: list[MutableMapping[str, Any]] = []

    body_read = False

    async def receive() -> dict[str, Any]:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await client_left.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        # Writes that yield, as uvicorn's do while the socket's buffer is full.
        await asyncio.sleep(0)
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "headers": [
            (b"authorization", AUTH["Authorization"].encode()),
            (b"content-type", b"application/json"),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    try:
        serving = asyncio.create_task(app(scope, receive, send))
        msg = (await handed_off.next_msg(timeout=5.0)).data
        request = ChatRequest.FromString(msg)
        assert request.request_id in replies
        # The client gives up while the pipeline is still choosing hosts ...
        client_left.set()
        await asyncio.sleep(0.05)
        # ... and then the first token arrives, with more behind it.
        for event in (
            ClientEvent(started=ClientStarted(model="m")),
            ClientEvent(delta=ClientDelta(text="too late")),
        ):
            await nc.publish(request.reply_subject, event.SerializeToString())
        await asyncio.wait_for(serving, 10.0)
        subject = await asyncio.wait_for(cancelled.get(), 5.0)
        assert subject == subjects.request_cancel(request.request_id)
        assert request.request_id not in replies
        assert ingress.limits.in_flight == 0
        assert not any(m.get("body") for m in sent), "no byte of the body reached the client"
    finally:
        await nc.drain()
