"""Structured outputs, tool calls and sampling controls through a live `epd serve` with the official
`openai` client (and gRPC): the random-weight tiny model answers only with what the grammar allows,
streams equal answers, tool calls parse and match their schemas, and bad input is a 400 that names
the field and leaves the server serving."""

from __future__ import annotations

import json
from typing import Literal

import grpc
import jsonschema
import openai
import pytest
from openai.lib._parsing._completions import type_to_response_format_param
from pydantic import BaseModel, Field

from serving.engine.inputs import Prompt
from serving.rpc.proto import generate_pb2 as pb
from serving.types import SamplingParams
from tests.e2e.conftest import API_KEY
from tests.e2e.grpc_client import by_choice, generate, user

MODEL = "epd-tiny"
MESSAGES = [{"role": "user", "content": "Read the invoice into JSON."}]


class Invoice(BaseModel):
    id: str = Field(max_length=6)
    paid: bool
    total: int = Field(ge=0, le=999)
    kind: Literal["a", "b"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time"}}
NONSENSE = {"type": "nonsense"}
A_CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def sampled(**kw) -> dict:
    return dict(model=MODEL, messages=MESSAGES, temperature=1.0, max_tokens=200) | kw


def test_parse_with_a_pydantic_model_and_its_stream_give_the_same_text(client):
    fmt = type_to_response_format_param(Invoice)
    for seed in range(8):
        done = client.beta.chat.completions.parse(**sampled(seed=seed), response_format=Invoice)
        message = done.choices[0].message
        assert isinstance(message.parsed, Invoice), message.content
        assert done.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(**sampled(seed=seed), response_format=fmt, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == message.content


@pytest.mark.parametrize(
    "fmt",
    [
        {"response_format": {"type": "json_object"}, "max_tokens": 400},
        {"extra_body": {"structured_outputs": {"regex": "[a-z]{2,5}-[0-9]{2}"}}},
        {"extra_body": {"structured_outputs": {"choice": ["left", "right"]}}},
        {"extra_body": {"guided_choice": ["up", "down"]}},
        {"extra_body": {"structured_outputs": {"grammar": 'start: "(" /[1-9]/ ")"'}}},
    ],
)
def test_other_output_formats(client, fmt):
    import re

    for seed in range(5):
        kw = sampled(seed=seed) | fmt
        choice = client.chat.completions.create(**kw).choices[0]
        text = choice.message.content
        body = kw.get("extra_body", {})
        spec = body.get("structured_outputs", {}) | (
            {"choice": body["guided_choice"]} if "guided_choice" in body else {}
        )
        if "regex" in spec:
            assert re.fullmatch(spec["regex"], text)
        elif "choice" in spec:
            assert text in spec["choice"]
        elif "grammar" in spec:
            assert re.fullmatch(r"\([1-9]\)", text)
        elif choice.finish_reason == "stop":  # any object: random weights may write keys past the budget
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{")


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_required_and_named_tool_calls_always_parse_and_match(client):
    schema = WEATHER["function"]["parameters"]
    for seed in range(6):
        done = client.chat.completions.create(
            **sampled(seed=seed), tools=[WEATHER, TIME], tool_choice="required"
        )
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
        for name, arguments in calls_of(choice.message):
            assert name in ("get_weather", "get_time")
            if name == "get_weather":
                jsonschema.validate(arguments, schema)
            else:
                assert arguments == {}
        named = client.chat.completions.create(
            **sampled(seed=seed),
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        ((name, arguments),) = calls_of(named.choices[0].message)
        assert name == "get_weather"
        jsonschema.validate(arguments, schema)


def test_streamed_tool_call_deltas_reassemble_to_the_answer(client):
    for seed in range(4):
        kw = sampled(seed=seed) | dict(tools=[WEATHER, TIME], tool_choice="required")
        whole = client.chat.completions.create(**kw).choices[0]
        calls: dict[int, dict] = {}
        reasons = []
        for chunk in client.chat.completions.create(**kw, stream=True):
            for c in chunk.choices:
                for d in c.delta.tool_calls or []:
                    entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    entry["name"] += d.function.name or ""
                    entry["arguments"] += d.function.arguments or ""
                    assert d.id and d.type == "function"
                if c.finish_reason:
                    reasons.append(c.finish_reason)
        assert reasons == ["tool_calls"]
        streamed = [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)]
        assert streamed == calls_of(whole.message)


def test_auto_answers_text_or_calls_and_a_conversation_with_tool_results_runs(client):
    auto = client.chat.completions.create(**sampled(seed=1), tools=[WEATHER])
    message = auto.choices[0].message
    assert message.content or message.tool_calls
    first = client.chat.completions.create(
        **sampled(seed=2), tools=[WEATHER], tool_choice="required"
    ).choices[0]
    call = first.message.tool_calls[0]
    conversation = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    again = client.chat.completions.create(
        model=MODEL, messages=conversation, tools=[WEATHER], temperature=0, max_tokens=16
    )
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert again.usage.prompt_tokens > auto.usage.prompt_tokens  # the call and its result are in the prompt


def test_logit_bias_and_penalties_equal_the_engine(client, engine):
    prompt = Prompt(engine.tokenizer.encode_chat(MESSAGES))
    controls = dict(temperature=0.9, seed=5, frequency_penalty=1.5, presence_penalty=0.5)
    extra = dict(min_p=0.05, repetition_penalty=1.3)
    cases = [
        (dict(logit_bias={"42": 100}), SamplingParams(max_tokens=8, logit_bias=((42, 100.0),))),
        (controls | {"extra_body": extra}, SamplingParams(max_tokens=8, **controls, **extra)),
    ]
    for body, params in cases:
        kw = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0) | body
        served = client.chat.completions.create(**kw).choices[0].message.content
        assert served == engine.generate([(prompt, params)])[0].text
    forced = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, logit_bias={"42": 100}
    )
    assert forced.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": NONSENSE}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"guided_json": "not json"}, "guided_json"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
        ({"logit_bias": {"abc": 1}}, "logit_bias.abc"),
        ({"logit_bias": {"999999999": 1}}, "logit_bias.999999999"),
        ({"logit_bias": {"1": 1000}}, "logit_bias.1"),
        ({"min_p": 2}, "min_p"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [A_CALL]}]}, "messages.0.tool_calls"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_naming_the_field_and_the_server_goes_on(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            **(dict(model=MODEL, messages=MESSAGES, max_tokens=4) | {"extra_body": body})
        )
    error = err.value.body
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]
    ok = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def channel(server, grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        yield ch


def test_grpc_json_schema_and_tool_calls(channel):
    schema = Invoice.model_json_schema() | {"additionalProperties": False}
    sampling = pb.SamplingParams(max_tokens=200, temperature=1.0, seed=3)
    request = pb.GenerateRequest(
        messages=[user("Read the invoice.")],
        sampling=sampling,
        output=pb.OutputFormat(json_schema=json.dumps(schema)),
    )
    (responses,) = by_choice(generate(channel, request)).values()
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
    Invoice.model_validate_json("".join(r.text for r in responses))

    tools = [pb.Tool(name="get_weather", parameters=json.dumps(WEATHER["function"]["parameters"]))]
    request = pb.GenerateRequest(
        messages=[user("Weather?")],
        sampling=sampling,
        tools=tools,
        tool_choice=pb.ToolChoice(mode="required"),
    )
    (responses,) = by_choice(generate(channel, request)).values()
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_TOOL_CALLS and last.tool_calls
    for call in last.tool_calls:
        jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])

    bad = pb.GenerateRequest(messages=[user("x")], output=pb.OutputFormat(regex="("))
    with pytest.raises(grpc.RpcError) as err:
        generate(channel, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "output.regex" in err.value.details()
