"""The request body model turns OpenAI JSON into protobuf faithfully."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import orjson
import pytest
from pydantic import ValidationError

from llooma.privacy import Mapping
from llooma.selection import asked_features
from llooma.v1.common_pb2 import Usage
from llooma.v1.pipeline_pb2 import ClientDelta, ClientEvent, ClientFinished, ClientStarted
from services.ingress.answers import Restorers, restore, sse_event
from services.ingress.choices import merged
from services.ingress.headers import (
    DEADLINE_HEADER,
    PRIVACY_HEADER,
    RACE_WIDTH_HEADER,
    SPLIT_HEADER,
    InvalidHeader,
    RequestOptions,
    parse_options,
)
from services.ingress.schema import ChatCompletionRequest, describe_validation_error
from services.ingress.structured import answer_problem


def parse(body: str) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(body, strict=True)


def test_text_parts_are_joined() -> None:
    request = parse(
        '{"model": "m", "messages": [{"role": "user", "content": '
        '[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}'
    )
    assert [m.content for m in request.messages_proto()] == ["ab"]


def test_params_prefer_max_completion_tokens_and_wrap_stop() -> None:
    request = parse(
        '{"model": "m", "max_tokens": 5, "max_completion_tokens": 9, "stop": "END",'
        ' "temperature": 1, "messages": [{"role": "user", "content": "x"}]}'
    )
    params = request.params_proto()
    assert params.max_tokens == 9
    assert list(params.stop) == ["END"]
    assert params.temperature == pytest.approx(1.0)


def test_unknown_fields_are_ignored_and_n_is_bounded() -> None:
    parse('{"model": "m", "user": "u1", "messages": [{"role": "user", "content": "x"}]}')
    assert parse('{"model": "m", "n": 8, "messages": [{"role": "user", "content": "x"}]}').n == 8
    for n in (0, 9):
        with pytest.raises(ValidationError) as caught:
            parse(f'{{"model": "m", "n": {n}, "messages": [{{"role": "user", "content": "x"}}]}}')
        assert "'n'" in describe_validation_error(caught.value)


def test_bool_is_not_an_integer() -> None:
    with pytest.raises(ValidationError):
        parse('{"model": "m", "max_tokens": true, "messages": [{"role": "user", "content": "x"}]}')


def test_absent_sampling_parameters_stay_unset_and_zero_stays_zero() -> None:
    absent = parse('{"model": "m", "messages": [{"role": "user", "content": "x"}]}').params_proto()
    assert not absent.HasField("max_tokens")
    assert not absent.HasField("temperature")
    assert not absent.HasField("top_p")
    assert not absent.HasField("seed")
    assert not absent.HasField("presence_penalty")
    zero = parse(
        '{"model": "m", "temperature": 0, "top_p": 0, "seed": 0, "frequency_penalty": 0,'
        ' "messages": [{"role": "user", "content": "x"}]}'
    ).params_proto()
    assert zero.HasField("temperature")
    assert zero.HasField("top_p")
    assert zero.HasField("seed")
    assert zero.HasField("frequency_penalty")
    assert (zero.temperature, zero.top_p, zero.seed, zero.frequency_penalty) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({DEADLINE_HEADER: "0"}, DEADLINE_HEADER),
        ({DEADLINE_HEADER: "60001"}, DEADLINE_HEADER),
        ({DEADLINE_HEADER: "1\n"}, DEADLINE_HEADER),
        ({DEADLINE_HEADER: "²"}, DEADLINE_HEADER),
        ({RACE_WIDTH_HEADER: "4"}, RACE_WIDTH_HEADER),
        ({PRIVACY_HEADER: "loose"}, PRIVACY_HEADER),
        ({SPLIT_HEADER: "maybe"}, SPLIT_HEADER),
    ],
)
def test_bad_request_headers_name_the_header(headers: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidHeader, match=message):
        parse_options(headers)


def test_request_headers_parse_and_default() -> None:
    assert parse_options({}) == RequestOptions()
    options = parse_options(
        {
            DEADLINE_HEADER: "0250",
            RACE_WIDTH_HEADER: "3",
            PRIVACY_HEADER: "strict",
            SPLIT_HEADER: "off",
        }
    )
    assert options == RequestOptions(deadline_ms=250, race_width=3, privacy="strict", no_split=True)


TOOL = (
    '{"type": "function", "function": {"name": "get_weather", "strict": true,'
    ' "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}'
)


def test_tools_and_tool_choice_pass_through_as_sent() -> None:
    request = parse(
        '{"model": "m", "messages": [{"role": "user", "content": "x"}],'
        f' "tools": [{TOOL}], "parallel_tool_calls": false,'
        ' "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}'
    )
    params = request.params_proto()
    assert orjson.loads(params.tools_json) == [orjson.loads(TOOL)]
    assert orjson.loads(params.tool_choice_json) == {
        "type": "function",
        "function": {"name": "get_weather"},
    }
    assert params.HasField("parallel_tool_calls")
    assert not params.parallel_tool_calls
    assert asked_features(params) == {"tools"}


def test_a_tool_round_trip_keeps_calls_and_ids() -> None:
    call = '{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}'
    request = parse(
        '{"model": "m", "messages": [{"role": "user", "content": "x"},'
        f' {{"role": "assistant", "content": null, "tool_calls": [{call}]}},'
        ' {"role": "tool", "tool_call_id": "c1", "content": "42"}]}'
    )
    assistant, tool = request.messages_proto()[1:]
    assert orjson.loads(assistant.tool_calls_json) == [orjson.loads(call)]
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "c1", "42")


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ('"messages": [{"role": "tool", "content": "42"}]', "tool_call_id"),
        (
            '"messages": [{"role": "user", "content": "x", "tool_calls": []}]',
            "tool_calls",
        ),
        ('"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2', "logprobs"),
        ('"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"', "tools"),
        (
            '"messages": [{"role": "user", "content": "x"}],'
            ' "response_format": {"type": "json_schema"}',
            "json_schema",
        ),
        (
            '"messages": [{"role": "user", "content": "x"}], "response_format":'
            ' {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": 5}}}',
            "not a valid JSON Schema",
        ),
    ],
)
def test_inconsistent_tool_and_format_fields_are_refused(extra: str, named: str) -> None:
    with pytest.raises(ValidationError) as raised:
        parse(f'{{"model": "m", {extra}}}')
    assert named in describe_validation_error(raised.value)


def test_response_format_and_logprobs_say_what_the_host_must_do() -> None:
    request = parse(
        '{"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": true,'
        ' "top_logprobs": 0, "response_format": {"type": "json_schema", "json_schema":'
        ' {"name": "p", "strict": true, "schema": {"type": "object", "required": ["a"]}}}}'
    )
    params = request.params_proto()
    assert orjson.loads(params.response_format_json) == {
        "type": "json_schema",
        "json_schema": {
            "name": "p",
            "strict": True,
            "schema": {"type": "object", "required": ["a"]},
        },
    }
    assert params.logprobs
    assert params.HasField("top_logprobs")
    assert params.top_logprobs == 0
    assert asked_features(params) == {"json_schema", "logprobs"}
    assert request.answer_schema() == {"type": "object", "required": ["a"]}
    assert answer_problem('{"a": 1}', {"type": "object", "required": ["a"]}, "stop") is None
    problem = answer_problem('{"b": 1}', {"type": "object", "required": ["a"]}, "stop")
    assert problem is not None
    assert "required" in problem
    cut = answer_problem('{"a": ', {"type": "object"}, "length")
    assert cut is not None
    assert "cut at max_tokens" in cut


async def test_several_choices_finish_one_by_one_and_the_request_once() -> None:
    def usage(output: int) -> Usage:
        return Usage(input_tokens=5, output_tokens=output)

    async def races() -> AsyncGenerator[list[ClientEvent]]:
        yield [
            ClientEvent(started=ClientStarted(), choice_index=1),
            ClientEvent(delta=ClientDelta(text="b"), choice_index=1),
            ClientEvent(
                finished=ClientFinished(finish_reason="length", usage=usage(3)), choice_index=1
            ),
        ]
        yield [ClientEvent(finished=ClientFinished(finish_reason="stop", usage=usage(2)))]

    out = [event async for batch in merged(races(), 2) for event in batch]
    assert [e.WhichOneof("event") for e in out] == ["delta", "delta", "delta", "finished"]
    assert [(e.choice_index, e.delta.finish_reason) for e in out[1:3]] == [
        (1, "length"),
        (0, "stop"),
    ]
    assert (out[-1].finished.usage.input_tokens, out[-1].finished.usage.output_tokens) == (5, 5)
    head = b"data: {"
    assert sse_event(head, out[1], include_usage=False, many=True) == (
        b'data: {"choices":[{"index":1,"delta":{},"finish_reason":"length"}]}\n\n'
    )
    assert sse_event(head, out[-1], include_usage=False, many=True) == b"data: [DONE]\n\n"


def test_originals_go_back_into_tool_call_arguments_as_json() -> None:
    restorers = Restorers(Mapping.from_dict({"[NAME_1]": 'Ann "Nan" O\\Brien'}))
    pieces = ['{"who": "[NA', 'ME_1]", "n": 1}']
    batch = [
        ClientEvent(delta=ClientDelta(tool_calls_json=[_arguments(piece)]), choice_index=0)
        for piece in pieces
    ]
    batch.append(ClientEvent(finished=ClientFinished(finish_reason="tool_calls")))
    restored = restore(batch, restorers)
    arguments = "".join(
        call["function"]["arguments"]
        for event in restored
        if event.HasField("delta")
        for fragment in event.delta.tool_calls_json
        for call in orjson.loads(fragment)
    )
    assert orjson.loads(arguments) == {"who": 'Ann "Nan" O\\Brien', "n": 1}
    # Nothing redacted: the engine's fragments as they came.
    untouched = _arguments('{"who": "[NAME_1]"}')
    assert Restorers(Mapping()).tool_calls(0, untouched) == untouched


def _arguments(piece: str) -> str:
    return orjson.dumps([{"index": 0, "function": {"arguments": piece}}]).decode()
