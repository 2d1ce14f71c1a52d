"""Tools, structured output and logprobs through the whole stack, with the official `openai`
client: a scripted upstream (tests/support/scripted_upstream.py) behind two hosts with the
`openai` backend, on a stack of their own. Each parameter must reach the engine as sent, and
each answer reach the client as the client expects.

`scripted` is announced with tools, JSON mode, JSON schema and logprobs; `plain` (the same
engine) with none of them, so a request that needs one is refused there, never downgraded.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from openai import AsyncStream
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
)
from pydantic import BaseModel

from llooma.host.config import Features, Generation, HostConfig, ModelConfig
from llooma.processes import free_port
from llooma.settings import DEV_API_KEY
from llooma.stack import Stack
from tests.stack.test_race import wait_listed
from tests.support.ledger_db import new_database
from tests.support.scripted_upstream import (
    BREAK_THE_SCHEMA,
    PERSON,
    TOOL_RESULT_ANSWER,
    ScriptedUpstream,
    logprob_entry,
    sent_tool_calls,
    tool_fragments,
)

CAPABLE = "scripted"
PLAIN = "plain"
EVERYTHING = Features(tools=True, json_mode=True, json_schema=True, logprobs=True)
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


class Person(BaseModel):
    name: str
    age: int


async def _read_text(stream: AsyncStream[ChatCompletionChunk], into: list[str]) -> None:
    async for chunk in stream:
        into.extend(choice.delta.content or "" for choice in chunk.choices)


def marker() -> str:
    return f"case {uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    running = ScriptedUpstream().start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def features_stack(
    upstream: ScriptedUpstream, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    def model(name: str, features: Features) -> ModelConfig:
        return ModelConfig(
            name=name,
            backend="openai",
            base_url=upstream.base_url,
            upstream_model="scripted",
            features=features,
            generation=Generation(max_tokens=64),
        )

    stack = Stack(
        root=tmp_path_factory.mktemp("features-stack"),
        http_port=free_port(),
        database_url=new_database(database_url, "features"),
        hosts=[
            HostConfig(
                name="features-host",
                models=[model(CAPABLE, EVERYTHING), model(PLAIN, Features())],
            )
        ],
        extra_env={"LLOOMA_DUEL_FRACTION": "0"},
    )
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
async def client(features_stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    async with httpx.AsyncClient(base_url=features_stack.base_url, timeout=30.0) as http:
        for model in (CAPABLE, PLAIN):
            await wait_listed(http, model)
    async with openai.AsyncOpenAI(
        base_url=f"{features_stack.base_url}/v1", api_key=DEV_API_KEY, max_retries=0, timeout=30.0
    ) as stack_client:
        yield stack_client


async def test_tools_reach_the_engine_and_tool_calls_come_back(
    client: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    tag = marker()
    response = await client.chat.completions.create(
        model=CAPABLE,
        messages=[{"role": "user", "content": f"What is the weather in Paris? {tag}"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
    )

    sent = upstream.body_with(tag)
    assert sent["tools"] == [WEATHER_TOOL]
    assert sent["tool_choice"] == "required"
    assert sent["parallel_tool_calls"] is False
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id == "call_up_1"
    assert call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}


async def test_streamed_tool_call_deltas_are_relayed_exactly(
    client: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    tag = marker()
    content = f"Weather in Paris, streamed {tag}"
    relayed = []
    finish = None
    stream = await client.chat.completions.create(
        model=CAPABLE,
        messages=[{"role": "user", "content": content}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.tool_calls:
                relayed.append(
                    [call.model_dump(exclude_none=True) for call in choice.delta.tool_calls]
                )
            finish = choice.finish_reason or finish

    assert upstream.body_with(tag)["tool_choice"] == {
        "type": "function",
        "function": {"name": "get_weather"},
    }
    assert relayed == sent_tool_calls(upstream.sent[content])
    assert relayed == tool_fragments("get_weather")
    assert finish == "tool_calls"


async def test_a_tool_round_trip_passes_the_calls_and_results_to_the_engine(
    client: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    tag = marker()
    call: ChatCompletionMessageFunctionToolCallParam = {
        "id": "call_7",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    response = await client.chat.completions.create(
        model=CAPABLE,
        messages=[
            {"role": "user", "content": f"What is the weather in Paris? {tag}"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_7", "content": "sunny, 21 C"},
        ],
        tools=[WEATHER_TOOL],
    )

    messages = upstream.body_with(tag)["messages"]
    assert messages[1] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert messages[2] == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_7"}
    assert response.choices[0].message.content == "".join(TOOL_RESULT_ANSWER)
    assert response.choices[0].message.tool_calls is None


async def test_a_model_without_tools_is_refused_not_downgraded(
    client: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    tag = marker()
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(
            model=PLAIN,
            messages=[{"role": "user", "content": f"Weather? {tag}"}],
            tools=[WEATHER_TOOL],
        )
    assert raised.value.status_code == 503
    assert "with tools" in raised.value.message
    with pytest.raises(LookupError):
        upstream.body_with(tag)
    # The same model without tools is served: the refusal was the capability, not the model.
    plain = await client.chat.completions.create(
        model=PLAIN, messages=[{"role": "user", "content": f"Hello {tag}"}]
    )
    assert plain.choices[0].message.content == "Hello world"


async def test_parse_with_a_pydantic_model_gets_a_validated_answer(
    client: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    tag = marker()
    completion = await client.chat.completions.parse(
        model=CAPABLE,
        messages=[{"role": "user", "content": f"Who wrote the first program? {tag}"}],
        response_format=Person,
    )

    sent = upstream.body_with(tag)["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["name"] == "Person"
    assert sent["json_schema"]["schema"]["required"] == ["name", "age"]
    assert completion.choices[0].message.parsed == Person(name="Ada", age=36)
    assert completion.choices[0].message.content == "".join(PERSON)


async def test_langchain_bind_tools_and_with_structured_output(
    features_stack: Stack, client: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    """LangChain's ChatOpenAI as applications use it: tool calls parsed into `tool_calls`, and
    a pydantic model filled from a json_schema answer."""
    chat = ChatOpenAI(
        model=CAPABLE,
        base_url=f"{features_stack.base_url}/v1",
        api_key=DEV_API_KEY,  # type: ignore[arg-type]
        max_retries=0,
        timeout=30.0,
    )
    tag = marker()
    message = await chat.bind_tools([dict(WEATHER_TOOL)], tool_choice="required").ainvoke(
        f"What is the weather in Paris? {tag}"
    )
    assert isinstance(message, AIMessage)
    assert upstream.body_with(tag)["tools"] == [WEATHER_TOOL]
    assert [(call["name"], call["args"], call["id"]) for call in message.tool_calls] == [
        ("get_weather", {"city": "Paris"}, "call_up_1")
    ]

    tag = marker()
    person = await chat.with_structured_output(Person).ainvoke(
        f"Who wrote the first program? {tag}"
    )
    assert person == Person(name="Ada", age=36)
    assert upstream.body_with(tag)["response_format"]["json_schema"]["name"] == "Person"


async def test_an_answer_that_breaks_the_schema_is_an_error_not_a_clean_finish(
    client: openai.AsyncOpenAI,
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": f"Who? {BREAK_THE_SCHEMA} {marker()}"}
    ]
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.parse(
            model=CAPABLE,
            messages=messages,
            response_format=Person,
        )
    assert raised.value.status_code == 502
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "invalid_structured_output"
    assert "age" in raised.value.message

    stream_messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": f"Who? {BREAK_THE_SCHEMA} {marker()}"}
    ]
    stream = await client.chat.completions.create(
        model=CAPABLE,
        messages=stream_messages,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Person", "schema": Person.model_json_schema()},
        },
        stream=True,
    )
    text: list[str] = []
    with pytest.raises(openai.APIError, match="does not match the json_schema"):
        await _read_text(stream, text)
    # What came out before the check still came out as the engine sent it.
    assert "".join(text).startswith('{"name": ')


async def test_a_schema_that_is_not_json_schema_is_a_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not a valid JSON Schema"):
        await client.chat.completions.create(
            model=CAPABLE,
            messages=[{"role": "user", "content": "Hi"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "Broken", "schema": {"type": "bogus"}},
            },
        )


async def test_json_object_reaches_the_engine(
    client: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    tag = marker()
    response = await client.chat.completions.create(
        model=CAPABLE,
        messages=[{"role": "user", "content": f"Answer in JSON {tag}"}],
        response_format={"type": "json_object"},
    )
    assert upstream.body_with(tag)["response_format"] == {"type": "json_object"}
    assert orjson.loads(response.choices[0].message.content or "") == {"ok": True}


async def test_logprobs_reach_the_engine_and_come_back_in_both_forms(
    client: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    tag = marker()
    response = await client.chat.completions.create(
        model=CAPABLE,
        messages=[{"role": "user", "content": f"Say hello {tag}"}],
        logprobs=True,
        top_logprobs=2,
    )
    sent = upstream.body_with(tag)
    assert sent["logprobs"] is True
    assert sent["top_logprobs"] == 2
    expected = [logprob_entry(piece, 2) for piece in ("Hello", " world")]
    logprobs = response.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert [entry.model_dump() for entry in logprobs.content] == expected

    streamed: list[dict[str, Any]] = []
    stream = await client.chat.completions.create(
        model=CAPABLE,
        messages=[{"role": "user", "content": f"Say hello, streamed {marker()}"}],
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.content:
                streamed.extend(entry.model_dump() for entry in choice.logprobs.content)
    assert streamed == expected


async def test_a_model_without_logprobs_is_refused(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(
            model=PLAIN, messages=[{"role": "user", "content": "Hi"}], logprobs=True
        )
    assert raised.value.status_code == 503
    assert "with logprobs" in raised.value.message


async def test_n_choices_are_raced_each_on_its_own(
    client: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    tag = marker()
    response = await client.chat.completions.create(
        model=CAPABLE,
        messages=[{"role": "user", "content": f"Say hello {tag}"}],
        n=3,
        logprobs=True,
    )
    asked = [r for r in list(upstream.engine.requests) if tag.encode() in r.body]
    # One engine request per choice, none of them asking the engine for n.
    assert len(asked) == 3
    assert all("n" not in r.json() for r in asked)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    for choice in response.choices:
        assert choice.message.content == "Hello world"
        assert choice.finish_reason == "stop"
        assert choice.logprobs is not None
        assert [entry.token for entry in choice.logprobs.content or []] == ["Hello", " world"]
    assert response.usage is not None
    assert response.usage.prompt_tokens == 9
    assert response.usage.completion_tokens == 3 * 2


async def test_n_streamed_choices_carry_their_index(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=CAPABLE,
        messages=[{"role": "user", "content": f"Say hello, twice {marker()}"}],
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "Hello world", 1: "Hello world"}
    assert finishes == {0: "stop", 1: "stop"}
    assert usage is not None
    assert usage.completion_tokens == 4


async def test_each_of_n_json_schema_answers_is_checked(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.parse(
        model=CAPABLE,
        messages=[{"role": "user", "content": f"Who? {marker()}"}],
        response_format=Person,
        n=2,
    )
    assert [c.message.parsed for c in completion.choices] == [Person(name="Ada", age=36)] * 2
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.parse(
            model=CAPABLE,
            messages=[{"role": "user", "content": f"Who? {BREAK_THE_SCHEMA} {marker()}"}],
            response_format=Person,
            n=2,
        )
    assert raised.value.status_code == 502


async def test_tool_call_arguments_get_the_users_originals_back(
    client: openai.AsyncOpenAI, upstream: ScriptedUpstream
) -> None:
    address = "ada.lovelace@example.com"
    tag = marker()
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": f"Mail the report to {address} {tag}"}
    ]
    response = await client.chat.completions.create(
        model=CAPABLE, messages=messages, tools=[WEATHER_TOOL]
    )
    # The engine saw a placeholder, cut across two fragments of its call; the client the address.
    assert address not in upstream.body_with(tag)["messages"][-1]["content"]
    calls = response.choices[0].message.tool_calls
    assert calls is not None
    call = calls[0]
    assert call.type == "function"
    assert orjson.loads(call.function.arguments) == {"to": address}

    arguments = ""
    stream = await client.chat.completions.create(
        model=CAPABLE, messages=messages, tools=[WEATHER_TOOL], stream=True
    )
    async for chunk in stream:
        for choice in chunk.choices:
            for fragment in choice.delta.tool_calls or []:
                if fragment.function is not None:
                    arguments += fragment.function.arguments or ""
    assert orjson.loads(arguments) == {"to": address}
