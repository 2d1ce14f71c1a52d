"""What the race passes on from a real engine, on the running stack (issue 14, items 4, 9, 10):
an engine's refusal as the client's error, reasoning text, the answering host and model in the
headers, and the engine's own usage billed within what was relayed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from nats.aio.client import Client

from llooma import subjects
from llooma.v1.common_pb2 import ERROR_CODE_REQUEST_REJECTED, ErrorDetail, Usage
from llooma.v1.host_pb2 import HostChunk, HostFinished, HostTask, HostToken
from llooma.v1.settlement_pb2 import (
    ATTEMPT_OUTCOME_LOST,
    ATTEMPT_OUTCOME_REJECTED,
    ATTEMPT_OUTCOME_WON,
)
from tests.conftest import AUTH, RaceEvents
from tests.reliability.test_host_lies import Settlements
from tests.stack.test_race import chat, wait_listed
from tests.support.scripted_host import Reply, ScriptedHost


@pytest.fixture
async def settlements(nc: Client) -> AsyncIterator[Settlements]:
    found = Settlements()
    subscription = await nc.subscribe(subjects.SETTLEMENT_TASK, cb=found.on_settlement)
    yield found
    await subscription.unsubscribe()


@pytest.mark.timeout(60)
async def test_an_engines_refusal_is_the_clients_error_and_not_the_hosts(
    http: httpx.AsyncClient, nc: Client, race_events: RaceEvents, settlements: Settlements
) -> None:
    model = f"refuses-{uuid.uuid4().hex[:6]}"

    async def refuse(task: HostTask, reply: Reply) -> None:
        detail = ErrorDetail(
            code=ERROR_CODE_REQUEST_REJECTED,
            message="the prompt is longer than the context",
            http_status=400,
            client_code="context_length_exceeded",
        )
        await reply(HostChunk(seq=1, failed=detail))

    async with ScriptedHost(nc, f"refuser-{model}", model, refuse) as host:
        await wait_listed(http, model)
        response = await http.post("/v1/chat/completions", json=chat(model), headers=AUTH)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
        assert "context" in error["message"]
        request_id = response.headers["x-llooma-request-id"]
        event = await race_events.wait_for(request_id)
        # No retry, no fallback: one attempt, said "rejected", settled as lost (nothing owed).
        assert len(host.received) == 1
        (attempt,) = event.attempts
        assert attempt.outcome == ATTEMPT_OUTCOME_REJECTED
        assert event.error == ERROR_CODE_REQUEST_REJECTED
        settled = (await settlements.wait_for(request_id))[f"refuser-{model}"]
        assert settled.outcome == ATTEMPT_OUTCOME_LOST

        # Streaming: the same error as OpenAI's shape before the stream starts.
        body = {**chat(model), "stream": True}
        response = await http.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.timeout(60)
async def test_reasoning_headers_model_echo_and_engine_usage(
    http: httpx.AsyncClient, nc: Client, settlements: Settlements
) -> None:
    model = f"thinks-{uuid.uuid4().hex[:6]}"

    async def think(task: HostTask, reply: Reply) -> None:
        await reply(HostChunk(seq=1, token=HostToken(reasoning="Let me see. ")))
        await reply(HostChunk(seq=2, token=HostToken(reasoning="Two.")))
        await reply(HostChunk(seq=3, token=HostToken(text="The answer")))
        await reply(HostChunk(seq=4, token=HostToken(text=" is two.")))
        # The engine's own count: more tokens than chunks (it batched some), within the bytes.
        usage = Usage(input_tokens=21, output_tokens=9, reported_by_engine=True)
        await reply(HostChunk(seq=5, finished=HostFinished(finish_reason="stop", usage=usage)))

    host_id = f"thinker-{model}"
    async with ScriptedHost(nc, host_id, model, think):
        await wait_listed(http, model)
        response = await http.post("/v1/chat/completions", json=chat(model), headers=AUTH)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] == model
        assert response.headers["x-llooma-host"] == host_id
        assert response.headers["x-llooma-model"] == model
        message = answer["choices"][0]["message"]
        assert message["content"] == "The answer is two."
        assert message["reasoning_content"] == "Let me see. Two."
        assert answer["usage"]["completion_tokens"] == 9
        assert answer["usage"]["prompt_tokens"] == 21
        settled = (await settlements.wait_for(response.headers["x-llooma-request-id"]))[host_id]
        assert settled.outcome == ATTEMPT_OUTCOME_WON
        assert settled.usage.output_tokens == 9
        assert settled.delivered_tokens >= 9

        body = {**chat(model), "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.headers["x-llooma-host"] == host_id
            events = [
                orjson.loads(line.removeprefix("data: "))
                async for line in r.aiter_lines()
                if line.startswith("data: {")
            ]
    deltas = [e["choices"][0]["delta"] for e in events if e.get("choices")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me see. Two."
    assert "".join(d.get("content", "") for d in deltas) == "The answer is two."
    assert {e["model"] for e in events} == {model}


@pytest.mark.timeout(60)
async def test_an_engines_usage_is_clamped_to_the_bytes_it_relayed(
    http: httpx.AsyncClient, nc: Client, settlements: Settlements
) -> None:
    model = f"overbills-{uuid.uuid4().hex[:6]}"

    async def overbill(task: HostTask, reply: Reply) -> None:
        await reply(HostChunk(seq=1, token=HostToken(text="ok")))
        usage = Usage(input_tokens=5, output_tokens=1_000, reported_by_engine=True)
        await reply(HostChunk(seq=2, finished=HostFinished(finish_reason="stop", usage=usage)))

    async with ScriptedHost(nc, f"biller-{model}", model, overbill):
        await wait_listed(http, model)
        response = await http.post("/v1/chat/completions", json=chat(model), headers=AUTH)
        assert response.status_code == 200
        settled = (await settlements.wait_for(response.headers["x-llooma-request-id"]))[
            f"biller-{model}"
        ]
    # Two bytes relayed, plus the allowance for what an engine holds back (no stop string).
    assert settled.usage.output_tokens == 2 + 2
    assert response.json()["usage"]["completion_tokens"] == 4
