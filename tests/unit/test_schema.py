"""The request body model turns OpenAI JSON into protobuf faithfully."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

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


def test_unknown_fields_are_ignored_but_n_above_one_is_refused() -> None:
    parse('{"model": "m", "user": "u1", "messages": [{"role": "user", "content": "x"}]}')
    with pytest.raises(ValidationError) as caught:
        parse('{"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}')
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
