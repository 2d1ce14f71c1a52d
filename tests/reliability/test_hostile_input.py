"""Hostile input at the HTTP edge: oversized bodies never reach NATS, and max_tokens holds
whatever the host does (the API's side; the racer's cut is in test_host_lies)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from llooma import subjects
from llooma.v1.common_pb2 import Usage
from llooma.v1.host_pb2 import HostChunk, HostFinished, HostTask, HostToken
from tests.conftest import AUTH
from tests.stack.test_race import wait_listed
from tests.support.scripted_host import Reply, ScriptedHost

PIPELINE_PREFIX = subjects.PIPELINE_PRIVACY.rsplit(".", 1)[0] + "."


def chat(model: str, content: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def test_oversized_bodies_are_refused_before_anything_reaches_nats(
    http: httpx.AsyncClient, nc: Client
) -> None:
    marker = f"oversized-{uuid.uuid4().hex}"
    huge = orjson.dumps(chat("echo", marker + "x" * (1024 * 1024)))
    seen: list[Msg] = []

    async def observe(msg: Msg) -> None:
        seen.append(msg)

    # Everything on the bus while the requests are made: heartbeats, and nothing else.
    subscription = await nc.subscribe(">", cb=observe)
    await nc.flush()

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(huge), 65536):
            yield huge[start : start + 65536]

    declared = await http.post("/v1/chat/completions", content=huge, headers=AUTH)
    streamed = await http.post("/v1/chat/completions", content=chunked(), headers=AUTH)
    # A request that does go through, to prove the observer sees hand-offs when there are any.
    accepted = await http.post(
        "/v1/chat/completions", json=chat("echo", "small", max_tokens=1), headers=AUTH
    )
    await nc.flush()
    await asyncio.sleep(0.3)
    await subscription.unsubscribe()

    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
    assert accepted.status_code == 200
    hand_offs = [m for m in seen if m.subject.startswith(PIPELINE_PREFIX)]
    # Each stage's hand-off carries the request id (with the stage as a suffix).
    request_ids = {(m.headers or {}).get("Nats-Msg-Id", "").split(".")[0] for m in hand_offs}
    assert request_ids == {accepted.headers["x-llooma-request-id"]}
    assert not [m.subject for m in seen if marker.encode() in m.data]


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_bounds_what_the_client_gets_and_is_billed(
    http: httpx.AsyncClient, stream: bool
) -> None:
    prompt = " ".join(f"word{i}" for i in range(300))
    body = chat("echo", prompt, max_tokens=7, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as reply:
            assert reply.status_code == 200
            events = [
                orjson.loads(line[6:])
                async for line in reply.aiter_lines()
                if line.startswith("data: {")
            ]
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        usage = events[-1]["usage"]
        finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    else:
        reply = await http.post("/v1/chat/completions", json=body, headers=AUTH)
        assert reply.status_code == 200
        answer = reply.json()
        text = answer["choices"][0]["message"]["content"]
        usage = answer["usage"]
        finish = [answer["choices"][0]["finish_reason"]]
    assert usage["completion_tokens"] == 7
    assert text.split() == prompt.split()[:7]
    assert finish == ["length"]


@pytest.mark.timeout(60)
async def test_a_flooding_host_cannot_push_usage_or_text_past_max_tokens(
    http: httpx.AsyncClient, nc: Client
) -> None:
    model = f"flood-api-{uuid.uuid4().hex[:6]}"

    async def flood(task: HostTask, reply: Reply) -> None:
        for seq in range(150):
            await reply(HostChunk(seq=seq, token=HostToken(text=f"t{seq} ")))
        lie = Usage(input_tokens=2, output_tokens=1_000_000)
        await reply(HostChunk(seq=150, finished=HostFinished(finish_reason="stop", usage=lie)))

    async with ScriptedHost(nc, f"flooder-{model}", model, flood):
        await wait_listed(http, model)
        reply = await http.post(
            "/v1/chat/completions", json=chat(model, "go", max_tokens=5), headers=AUTH
        )
    assert reply.status_code == 200
    answer = reply.json()
    assert answer["choices"][0]["message"]["content"].split() == ["t0", "t1", "t2", "t3", "t4"]
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] <= 5
