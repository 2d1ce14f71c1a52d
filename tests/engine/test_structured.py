"""Structured output and logprobs from a real engine through the stack: llama.cpp constrains a
`json_schema` answer with a grammar, and the stack passes the schema, checks the answer and
relays it; logprobs come back as the engine gave them. The reference is the same request sent
to llama-server directly, greedy on both sides."""

from __future__ import annotations

from typing import Literal

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel

from llooma.engine import UPSTREAM_MODEL
from tests.engine.conftest import ONLY, EngineRig

pytestmark = pytest.mark.engine
# Each request is raced on one host (the model only engine a serves), so there is no fallback:
# the first token of a grammar-constrained answer (llama.cpp compiles the schema first) gets
# the time a loaded machine needs, through the client's own deadline header.
PATIENT = {"x-llooma-first-token-deadline-ms": "10000"}


@pytest.fixture(autouse=True)
def idle_engines(rig: EngineRig) -> None:
    rig.wait_idle()


MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Is the sea salty? Answer in JSON."}
]


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    sure: bool


async def test_a_json_schema_answer_is_the_engines_and_matches_the_schema(
    client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI
) -> None:
    through = await client.chat.completions.parse(
        model=ONLY["a"],
        messages=MESSAGES,
        response_format=Verdict,
        temperature=0,
        max_tokens=48,
        extra_headers=PATIENT,
    )
    reference = await direct.chat.completions.parse(
        model=UPSTREAM_MODEL,
        messages=MESSAGES,
        response_format=Verdict,
        temperature=0,
        max_tokens=48,
    )
    message = through.choices[0].message
    assert isinstance(message.parsed, Verdict)
    assert message.content == reference.choices[0].message.content


async def test_logprobs_are_the_engines(
    client: openai.AsyncOpenAI, direct: openai.AsyncOpenAI
) -> None:
    through, reference = [
        await source.chat.completions.create(
            model=model,
            messages=MESSAGES,
            temperature=0,
            max_tokens=8,
            logprobs=True,
            top_logprobs=2,
            extra_headers=PATIENT,
        )
        for source, model in ((client, ONLY["a"]), (direct, UPSTREAM_MODEL))
    ]
    got = through.choices[0].logprobs
    expected = reference.choices[0].logprobs
    assert got is not None
    assert expected is not None
    assert got.content
    assert [e.token for e in got.content] == [e.token for e in expected.content or []]
    assert all(len(e.top_logprobs) == 2 for e in got.content)
