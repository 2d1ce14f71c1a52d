"""What a client sees through the stack from a real engine, against what the engine itself says:
text streamed and not, greedy decoding, usage, finish reasons and client errors.

The reference is always the same request sent to llama-server directly. The model is a small
base model: these tests judge transport and protocol, never the quality of an answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from llooma.settings import ORCHESTRATED_MODEL
from tests.engine.conftest import MODEL, ONLY, EngineRig, listed_models

pytestmark = pytest.mark.engine

PROMPT = "Write three sentences about the sea."
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]


@dataclass
class Answer:
    text: str
    finish_reason: str | None
    usage: CompletionUsage | None


async def ask(
    client: openai.AsyncOpenAI,
    model: str,
    *,
    stream: bool = False,
    max_tokens: int,
    temperature: float | None = None,
    stop: list[str] | None = None,
    include_usage: bool = False,
    messages: list[ChatCompletionMessageParam] = MESSAGES,
) -> Answer:
    """One completion, streamed or not, as text, finish_reason and usage."""
    sampling: dict[str, Any] = {}
    if temperature is not None:
        sampling["temperature"] = temperature
    if stop is not None:
        sampling["stop"] = stop
    if not stream:
        completion = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, **sampling
        )
        choice = completion.choices[0]
        return Answer(choice.message.content or "", choice.finish_reason, completion.usage)
    chunks = await client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True} if include_usage else openai.omit,
        **sampling,
    )
    answer = Answer("", None, None)
    async for chunk in chunks:
        answer.usage = chunk.usage or answer.usage
        for delta in chunk.choices:
            answer.text += delta.delta.content or ""
            answer.finish_reason = delta.finish_reason or answer.finish_reason
    return answer


async def test_the_engines_and_the_stack_are_up(rig: EngineRig) -> None:
    for server in rig.engines.values():
        assert server.healthy()
        # The Gemma turn format, not the ChatML the file carries.
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as engine:
            response = await engine.post("/apply-template", json={"messages": MESSAGES})
        assert response.status_code == 200
        assert "<start_of_turn>user\n" in response.json()["prompt"]
    assert {MODEL, *ONLY.values(), ORCHESTRATED_MODEL} <= listed_models(rig.base_url)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", [MODEL, ORCHESTRATED_MODEL])
async def test_answers_streamed_and_not(
    client: openai.AsyncOpenAI, model: str, stream: bool
) -> None:
    answer = await ask(client, model, stream=stream, max_tokens=24, include_usage=True)
    assert answer.text.strip()
    assert answer.finish_reason in ("stop", "length")
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0


@pytest.mark.parametrize("model", [MODEL, ORCHESTRATED_MODEL])
async def test_temperature_zero_three_times_gives_the_engines_greedy_text(
    client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI, model: str
) -> None:
    reference = await ask(direct, "any", max_tokens=40, temperature=0)
    texts = [(await ask(client, model, max_tokens=40, temperature=0)).text for _ in range(3)]
    assert texts[0] == texts[1] == texts[2]
    assert texts[0] == reference.text


@pytest.mark.parametrize("stream", [False, True])
async def test_usage_is_what_the_engine_reports(
    client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI, stream: bool
) -> None:
    reference = await ask(direct, "any", max_tokens=24, temperature=0)
    answer = await ask(
        client, MODEL, stream=stream, max_tokens=24, temperature=0, include_usage=True
    )
    assert reference.usage is not None
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == reference.usage.prompt_tokens
    assert answer.usage.completion_tokens == reference.usage.completion_tokens
    assert answer.usage.total_tokens == reference.usage.total_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_gives_the_engines_finish_reason(
    client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI, stream: bool
) -> None:
    reference = await ask(direct, "any", max_tokens=5, temperature=0)
    assert reference.finish_reason == "length"
    answer = await ask(client, MODEL, stream=stream, max_tokens=5, temperature=0)
    assert answer.finish_reason == "length"
    assert answer.text == reference.text


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_gives_the_engines_finish_reason(
    client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI, stream: bool
) -> None:
    free = await ask(direct, "any", max_tokens=40, temperature=0)
    # The base model starts by echoing the prompt: stop on the first word of its own, so the
    # engine stops well before max_tokens, on a word only the greedy answer reaches there.
    echoed = {w.strip(".,").lower() for w in PROMPT.split()}
    words = [w for w in free.text.split() if w.isalpha() and w.lower() not in echoed]
    assert words, f"the engine's greedy answer has no word of its own: {free.text!r}"
    stop = [words[0]]
    reference = await ask(direct, "any", max_tokens=40, temperature=0, stop=stop)
    assert reference.finish_reason == "stop"
    answer = await ask(client, MODEL, stream=stream, max_tokens=40, temperature=0, stop=stop)
    assert answer.finish_reason == "stop"
    assert answer.text == reference.text


async def test_a_prompt_longer_than_the_context_is_a_400(
    rig: EngineRig, client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI
) -> None:
    slot_ctx = rig.engines["a"].slot_ctx
    # Each "sea " is one token or more: well over one slot's context.
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "sea " * (slot_ctx + 200)}
    ]
    with pytest.raises(openai.BadRequestError):
        await ask(direct, "any", max_tokens=8, messages=messages)
    with pytest.raises(openai.BadRequestError) as raised:
        await ask(client, MODEL, max_tokens=8, messages=messages)
    assert raised.value.code == "context_length_exceeded"
    # A client's mistake is not the host's: both stay eligible.
    assert set(ONLY.values()) <= listed_models(rig.base_url)
