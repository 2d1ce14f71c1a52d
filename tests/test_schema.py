"""The request body model turns OpenAI JSON into protobuf faithfully."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

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
