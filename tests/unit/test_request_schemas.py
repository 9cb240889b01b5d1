"""Request bodies: strict types with bounds, unimplemented fields refused by name, and JSON refused
before the schema when it is too deep, not Unicode, or not JSON at all."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.api.errors import APIError
from serving.gateway.jsonbody import MAX_DEPTH, parse_body
from serving.gateway.schemas import ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": "m", "prompt": "hi"}


def chat(**fields):
    return ChatCompletionRequest.model_validate(CHAT | fields)


def text(**fields):
    return CompletionRequest.model_validate(TEXT | fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"n": "2"},
        {"n": 2.0},
        {"n": True},
        {"max_tokens": True},
        {"max_tokens": "16"},
        {"max_tokens": 2**31},
        {"temperature": "0.5"},
        {"temperature": True},
        {"temperature": 2.5},
        {"top_p": 0},
        {"top_k": -2},
        {"top_k": 2**31},
        {"top_k": 1.5},
        {"seed": -1},
        {"seed": "1"},
        {"stream": 1},
        {"stream": "true"},
        {"ignore_eos": "yes"},
        {"min_tokens": -1},
        {"logprobs": 1},
        {"top_logprobs": 21},
        {"stop": [""]},
        {"stop": ["x"] * 17},
        {"stop": "x" * 1025},
        {"stop": 5},
        {"presence_penalty": "x"},
        {"presence_penalty": 5},
        {"logit_bias": "x"},
        {"logit_bias": {"1": "x"}},
        {"model": 5},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "function", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    ],
)
def test_chat_wrong_types_and_bounds_refused(fields):
    with pytest.raises(ValidationError):
        chat(**fields)


def test_too_many_stop_strings_says_so():
    with pytest.raises(ValidationError, match="at most 16 strings, got 17"):
        chat(stop=["x"] * 17)


def test_floats_accept_integers_and_bounds_are_inclusive():
    body = chat(temperature=1, top_p=1, top_k=2**31 - 1, max_tokens=2**31 - 1, stop=["x" * 1024] * 16)
    assert body.temperature == 1.0 and isinstance(body.temperature, float)


@pytest.mark.parametrize("fields", [{"prompt": 5}, {"prompt": [1, 2]}, {"logprobs": 6}, {"echo": 1}])
def test_completions_wrong_types_refused(fields):
    with pytest.raises(ValidationError):
        text(**fields)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {"include_usage": False}}, "stream_options"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ],
)  # fmt: skip
def test_unimplemented_fields_refused_by_name(fields, param):
    assert chat(**fields).refusal()[0] == param


@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "repetition_penalty": 1},
        {"response_format": {"type": "text"}},
        # implemented: sampling controls, output formats and tools (what they mean is tested elsewhere)
        {"logit_bias": {"50256": -100}, "presence_penalty": 0.5, "frequency_penalty": -1, "min_p": 0.1},
        {"repetition_penalty": 1.2, "guided_json": {"type": "object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}},
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
        {"tool_choice": {"type": "function", "function": {"name": "f"}}},
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "content": "1"},
            ]
        },
        {"tools": [], "tool_choice": "none"},
        {"tool_choice": "auto", "function_call": "none", "functions": []},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"modalities": ["text"], "parallel_tool_calls": False},
        {"user": "u", "metadata": {"a": "b"}, "store": False, "service_tier": "auto"},  # ignored
    ],
)
def test_neutral_values_and_harmless_fields_accepted(fields):
    assert chat(**fields).refusal() is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of")],
)
def test_completions_unimplemented_fields_refused(fields, param):
    assert text(**fields).refusal()[0] == param
    assert text(best_of=1).refusal() is None


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_nesting_depth_limit():
    parse_body(nested(MAX_DEPTH))
    for depth in (MAX_DEPTH + 1, 1000, 100_000):
        with pytest.raises(APIError) as err:
            parse_body(nested(depth))
        assert err.value.status == 400 and "nested" in err.value.message
    deep_object = b'{"a":' * 200 + b"1" + b"}" * 200
    with pytest.raises(APIError):
        parse_body(deep_object)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "\\ud800"}',  # lone high surrogate
        b'{"model": "x\\udfff y"}',  # lone low surrogate
        b'{"\\ud800": 1}',  # in a key
        b'{"messages": [{"content": [{"text": "\\udc00"}]}]}',
    ],
)
def test_lone_surrogates_refused(raw):
    with pytest.raises(APIError) as err:
        parse_body(raw)
    assert err.value.code == "invalid_unicode"


@pytest.mark.parametrize(
    "raw", [b'{"t": NaN}', b'{"t": Infinity}', b'{"t": -Infinity}', b"\xff\xfe{", b"{", b""]
)
def test_not_json_refused(raw):
    with pytest.raises(APIError) as err:
        parse_body(raw)
    assert err.value.status == 400 and err.value.code == "invalid_json"


def test_valid_unicode_passes():
    # A JSON surrogate pair (\ud83d\ude00) is one valid character; so are raw UTF-8 emoji and CJK.
    raw = '{"prompt": "pair \\ud83d\\ude00, emoji 😀, CJK 漢字"}'.encode()
    assert parse_body(raw) == {"prompt": "pair 😀, emoji 😀, CJK 漢字"}


def test_a_logit_bias_key_of_thousands_of_digits_is_not_a_token_id():
    """Past what int() parses by default (4,300 digits): the client's 400 names the key as no token
    id, rather than Python's own message."""
    from serving.api.requests import logit_bias_ids

    key = "9" * 5000
    with pytest.raises(APIError) as err:
        logit_bias_ids(((key, 1.0), ("3", 2.0)), 1664)
    assert err.value.status == 400 and "is not a token id" in err.value.message
    assert err.value.param == f"logit_bias.{key[:40]}"
    assert logit_bias_ids((("3", 2.0),), 1664) == ((3, 2.0),)
