"""The OpenAI endpoints beside chat (issue 16), on the running stack with the official
`openai` client: the x-ratelimit-* headers of the key's limits, `/v1/completions`,
`/v1/responses`, each raced, billed and answered in OpenAI's shapes."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest
from nats.aio.client import Client
from openai.types.chat import ChatCompletionMessageParam

from llooma.host.config import Features, HostConfig, ModelConfig
from llooma.host.worker import HostWorker
from llooma.ledger.economics import user_account
from llooma.settings import DEV_API_KEY, api_key_id
from llooma.stack import Stack
from tests.stack.test_billing import USER_PRICE, eventually
from tests.stack.test_race import wait_listed
from tests.support.extra_processes import extra_ingress
from tests.support.fake_engine import DONE, FakeEngine, Out, Request, event, stream_events, usage

PROBE_ANSWER = b"llamacpp:requests_processing 0\n"
DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s|(\d+)ms)$")


def seconds(duration: str) -> float:
    """An x-ratelimit-reset-* value ("500ms", "1.5s", "6m0s") in seconds."""
    match = DURATION.match(duration)
    assert match, duration
    hours, minutes, secs, millis = match.groups()
    total = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs or 0)
    return total + int(millis or 0) / 1000


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


def engine_host(model: str, nats_url: str, engine: FakeEngine, **model_fields: Any) -> HostConfig:
    """A host whose one model is served by the scripted engine through the openai backend."""
    return HostConfig(
        name=f"host-{model}",
        nats_url=nats_url,
        heartbeat_interval_s=0.2,
        models=[
            ModelConfig(
                name=model,
                backend="openai",
                base_url=engine.base_url,
                engine="llama.cpp",
                **model_fields,
            )
        ],
    )


@pytest.fixture
def client(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0)


async def charged(db: asyncpg.Connection, request_id: str) -> int:
    """What the ledger charged the dev key for a request's winning attempt, once posted."""

    async def charge() -> int | None:
        amount = await db.fetchval(
            "SELECT e.amount FROM ledger_entries e JOIN task_settlements s "
            "ON e.txn_id = 'attempt:' || s.attempt_id "
            "WHERE s.request_id = $1 AND s.outcome = 'won' AND e.account = $2 "
            "AND e.kind = 'charge'",
            request_id,
            user_account(api_key_id(DEV_API_KEY)),
        )
        return None if amount is None else -int(amount)

    return await eventually(charge)


async def test_rate_limit_headers_on_answers_and_refusals(stack: Stack) -> None:
    admin_key = stack.admin_key_file.read_text().strip()
    async with httpx.AsyncClient(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
    ) as admin:
        # A one-second burst: the request bucket holds 1 (refilled in 10 s), the token one 1000.
        made = await admin.post(
            "/admin/v1/keys", json={"name": "limited", "budget": 5, "rpm": 6, "tpm": 60000}
        )
    key = made.json()["key"]
    client = openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "count to three"}]
    for _ in range(100):
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="echo", messages=messages, max_tokens=8
            )
            break
        except openai.AuthenticationError:  # the key is not in this ingress's book yet
            await asyncio.sleep(0.05)
    headers = raw.headers
    assert headers["x-ratelimit-limit-requests"] == "6"
    assert headers["x-ratelimit-limit-tokens"] == "60000"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # Charged its estimate when admitted: 14 characters / 4 + 4 for the message + max_tokens.
    # (The bucket refills 1000 a second: a few ms between the charge and the header add some.)
    assert 1000 - (4 + 4 + 8) <= int(headers["x-ratelimit-remaining-tokens"]) <= 1000 - 8
    # Refilled at one request in 10 s: the shared counters' windows (the default) are 10 s long
    # here, and the request fell somewhere in one.
    assert 0 < seconds(headers["x-ratelimit-reset-requests"]) <= 10
    # The token counters' windows are 1 s long (1,000 of 60,000 a minute): the current one ends
    # within 1 s (a bound of 0.96 s failed once, on a request early in its window).
    assert 0 < seconds(headers["x-ratelimit-reset-tokens"]) <= 1.0
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="echo", messages=messages, max_tokens=8)
    limited = refused.value.response.headers
    assert limited["x-ratelimit-remaining-requests"] == "0"
    assert limited["x-ratelimit-limit-requests"] == "6"
    assert 0 < seconds(limited["x-ratelimit-reset-requests"]) < 10
    assert int(limited["retry-after"]) >= 1


async def test_completions_with_the_openai_client(
    client: openai.AsyncOpenAI, db: asyncpg.Connection
) -> None:
    raw = await client.completions.with_raw_response.create(
        model="echo", prompt="Once upon a time", max_tokens=16
    )
    answer = raw.parse()
    assert answer.object == "text_completion"
    assert answer.model == "echo"
    assert answer.id.startswith("cmpl-")
    (choice,) = answer.choices
    # The echo host answers the prompt itself.
    assert choice.text == "Once upon a time"
    assert choice.finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 4
    request_id = raw.headers["x-request-id"]
    assert await charged(db, request_id) == USER_PRICE * answer.usage.total_tokens

    stream = await client.completions.create(
        model="echo",
        prompt=["a list of one prompt"],
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert {chunk.object for chunk in chunks} == {"text_completion"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "a list of"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3

    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model="echo", prompt=["one", "two"], max_tokens=3)


async def test_completions_reach_the_engine_as_a_raw_prompt(
    http: httpx.AsyncClient, nc: Client, nats_url: str, client: openai.AsyncOpenAI
) -> None:
    async def engine_answer(request: Request, out: Out) -> None:
        if request.path != "/v1/completions":
            # The engine probe's.
            await out.whole(200, PROBE_ANSWER, "text/plain")
            return
        await stream_events(
            out,
            event({"object": "text_completion", "choices": [{"index": 0, "text": " there"}]}),
            event({"choices": [{"index": 0, "text": " was", "finish_reason": None}]}),
            event({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}),
            usage(5, 2),
            DONE,
        )

    model = f"raw-{uuid.uuid4().hex[:6]}"
    async with FakeEngine(handler=engine_answer) as engine:
        worker = HostWorker(engine_host(model, nats_url, engine), nc)
        await worker.start()
        try:
            await wait_listed(http, model)
            answer = await client.completions.create(
                model=model, prompt="Once upon a time", max_tokens=2, temperature=0, stop=["\n"]
            )
        finally:
            await worker.drain()
    assert answer.choices[0].text == " there was"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 2)
    sent = next(r for r in engine.requests if r.path == "/v1/completions").json()
    # The raw prompt, no chat template, every parameter as sent.
    assert sent["prompt"] == "Once upon a time"
    assert "messages" not in sent
    assert (sent["max_tokens"], sent["temperature"], sent["stop"]) == (2, 0, ["\n"])


async def test_responses_with_the_openai_client(
    client: openai.AsyncOpenAI, db: asyncpg.Connection
) -> None:
    raw = await client.responses.with_raw_response.create(
        model="echo", input="Tell me a story", instructions="Be brief.", max_output_tokens=16
    )
    answer = raw.parse()
    assert answer.object == "response"
    assert answer.status == "completed"
    assert answer.model == "echo"
    # The echo host answers the last user message: the input, after the instructions.
    assert answer.output_text == "Tell me a story"
    assert answer.usage is not None
    assert answer.usage.output_tokens == 4
    # Instructions and input both reached the host: 2 + 4 words.
    assert answer.usage.input_tokens == 6
    request_id = raw.headers["x-request-id"]
    assert await charged(db, request_id) == USER_PRICE * answer.usage.total_tokens

    stream = await client.responses.create(
        model="echo",
        input=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": [{"type": "input_text", "text": "one two three four"}]},
        ],
        max_output_tokens=3,
        stream=True,
    )
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "one two three"
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.output_text == "one two three"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.usage is not None
    assert last.response.usage.output_tokens == 3

    with pytest.raises(openai.BadRequestError, match="not stored"):
        await client.responses.create(model="echo", input="hi", previous_response_id="resp_1")


async def test_embeddings_from_hosts_that_serve_them(
    http: httpx.AsyncClient,
    nc: Client,
    nats_url: str,
    client: openai.AsyncOpenAI,
    db: asyncpg.Connection,
) -> None:
    async def engine_answer(request: Request, out: Out) -> None:
        if request.path != "/v1/embeddings":
            await out.whole(200, PROBE_ANSWER, "text/plain")
            return
        inputs = request.json()["input"]
        # Out of order, as the index says where each belongs.
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(text)), 0.5, -i / 4]}
            for i, text in reversed(list(enumerate(inputs)))
        ]
        body = {"data": data, "usage": {"prompt_tokens": 7 * len(inputs), "total_tokens": 0}}
        await out.whole(200, orjson.dumps(body))

    model = f"embeds-{uuid.uuid4().hex[:6]}"
    async with FakeEngine(handler=engine_answer) as engine:
        worker = HostWorker(
            engine_host(model, nats_url, engine, features=Features(embeddings=True)), nc
        )
        await worker.start()
        try:
            await wait_listed(http, model)
            # The openai client asks for base64 and decodes it.
            raw = await client.embeddings.with_raw_response.create(
                model=model, input=["one", "three"]
            )
            floats = await client.embeddings.create(
                model=model, input="four", encoding_format="float"
            )
        finally:
            await worker.drain()
    answer = raw.parse()
    assert [item.index for item in answer.data] == [0, 1]
    assert [item.embedding for item in answer.data] == [[3.0, 0.5, 0.0], [5.0, 0.5, -0.25]]
    assert answer.model == model
    assert answer.usage.prompt_tokens == 14
    assert answer.usage.total_tokens == 14
    assert floats.data[0].embedding == [4.0, 0.5, 0.0]
    sent = [r.json() for r in engine.requests if r.path == "/v1/embeddings"]
    assert sent[0]["input"] == ["one", "three"]
    assert sent[0]["model"] == model
    # Billed as chat: the prompt tokens, at the user's price.
    assert await charged(db, raw.headers["x-request-id"]) == USER_PRICE * 14

    # The echo hosts' bag-of-words vectors: the same text, the same vector.
    echoed = await client.embeddings.create(model="echo", input=["a b c", "c d", "a b c"])
    first, second, third = (item.embedding for item in echoed.data)
    assert first == third != second
    assert len(first) == 16
    assert echoed.usage.prompt_tokens == 8

    # A model whose hosts serve no embeddings: 503, never a chat answer in their place.
    with pytest.raises(openai.InternalServerError) as refused:
        await client.embeddings.create(model="synthetic-small", input="hi")
    assert refused.value.status_code == 503
    assert "embeddings" in refused.value.message


async def test_rate_limit_headers_from_the_shared_counters(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {"LLOOMA_RATE_LIMITS_SHARED": "true", "LLOOMA_RATE_LIMIT_RPM": "6"}
    with extra_ingress(stack, tmp_path_factory.mktemp("shared-headers"), env) as base_url:
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=DEV_API_KEY, max_retries=0)
        raw = await client.completions.with_raw_response.create(
            model="echo", prompt="one", max_tokens=1
        )
        # 6 a minute with a one-second burst: windows of 10 s that hold one request each.
        assert raw.headers["x-ratelimit-limit-requests"] == "6"
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        assert 0 < seconds(raw.headers["x-ratelimit-reset-requests"]) <= 10
        assert "x-ratelimit-limit-tokens" not in raw.headers
        with pytest.raises(openai.RateLimitError) as refused:
            await client.completions.create(model="echo", prompt="two", max_tokens=1)
    limited = refused.value.response.headers
    assert limited["x-ratelimit-limit-requests"] == "6"
    assert limited["x-ratelimit-remaining-requests"] == "0"
    assert 0 < seconds(limited["x-ratelimit-reset-requests"]) <= 10
