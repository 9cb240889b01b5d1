"""Tool calling pieces: the Qwen2.5 tool template, reading calls out of an answer (whole and streamed
in any split), and the grammars a request's fields become (or the 400 naming what is wrong)."""

from __future__ import annotations

import json

import pytest

from serving.api.errors import APIError
from serving.api.grammars import GrammarChecker
from serving.api.requests import (
    GenerateRequest,
    Message,
    OutputFormat,
    OutputKind,
    Sampling,
    Tool,
    ToolCall,
    ToolChoice,
    check_bounds,
    logit_bias_ids,
)
from serving.api.tools import CallStream, parse, template_calls, template_tools
from serving.engine.tokenizer import Tokenizer

WEATHER = Tool(
    "get_weather",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "The weather in a city",
)

NOT_OBJECT = '<tool_call>\n{"name": "f", "arguments": 3}\n</tool_call>'
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_template_renders_tools_and_turns_as_qwen25(tiny_model):
    tok = Tokenizer(tiny_model)
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": template_calls((ToolCall("c1", "get_weather", '{"city": "Paris"}'),))},
        {"role": "tool", "content": "sunny"},
    ]  # fmt: skip
    text = tok.apply_chat_template(messages, tools=template_tools((WEATHER,)))
    tool_json = json.dumps(template_tools((WEATHER,))[0], ensure_ascii=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions "
        "to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> "
        f"XML tags:\n<tools>\n{tool_json}\n</tools>\n\nFor each function call, return a json object with "
        'function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
        '<function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        f"<|im_start|>assistant\n{CALL}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without tools, nothing changes: the plain turns render as before.
    plain = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(plain) == tok.apply_chat_template(plain, tools=[])
    assert "# Tools" not in tok.apply_chat_template(plain)


def test_special_token_text_in_tools_is_refused(tiny_model):
    tok = Tokenizer(tiny_model)
    sneaky = template_tools((Tool("f", {"type": "object", "description": "<|im_end|>"}),))
    with pytest.raises(ValueError, match="special-token"):
        tok.encode_chat([{"role": "user", "content": "x"}], tools=sneaky)
    # ... while in message text it is plain text, as ever.
    assert tok.encode_chat([{"role": "user", "content": "<|im_end|>"}], tools=template_tools((WEATHER,)))


@pytest.mark.parametrize(
    ("text", "content", "names"),
    [
        (CALL, "", ["get_weather"]),
        (f"Let me check.\n{CALL}", "Let me check.", ["get_weather"]),
        (f"{CALL}\n{CALL}", "", ["get_weather", "get_weather"]),
        ("no calls here", "no calls here", []),
        ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
        (NOT_OBJECT, NOT_OBJECT, []),
        ("<tool_call>\n{\"name\": \"f\"", "<tool_call>\n{\"name\": \"f\"", []),  # cut off by max_tokens
    ],
)  # fmt: skip
def test_parse(text, content, names):
    got_content, calls = parse(text)
    assert got_content == content and [c.name for c in calls] == names
    for c in calls:
        assert json.loads(c.arguments) == {"city": "Paris"} and c.id.startswith("call_")


@pytest.mark.parametrize("text", [CALL, f"Sure.\n{CALL}\n{CALL} done", "plain <tool text", f"{CALL[:-3]}"])
def test_streamed_in_any_split_equals_whole(text):
    whole_content, whole_calls = parse(text)
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], list(text)):
            stream = CallStream()
            content, calls = "", []
            for piece in pieces:
                c, k = stream.feed(piece)
                content, calls = content + c, calls + k
            rest, _ = stream.finish()
            assert (content + rest).strip() == whole_content
            assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]


def fmt(kind: OutputKind, spec: object, param: str) -> dict:
    return dict(output=OutputFormat(kind, spec, param))


def request(**kw) -> GenerateRequest:
    return GenerateRequest("m", messages=(Message("user", "x"),), **kw)


@pytest.fixture(scope="module")
def checker(tiny_model):
    from serving.engine.models.config import load_model_config

    cfg = load_model_config(str(tiny_model))
    return GrammarChecker(str(tiny_model), cfg.text.vocab_size, cfg.eos_token_ids)


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        (fmt(OutputKind.JSON_SCHEMA, {"type": "nonsense"}, "response_format"), "response_format"),
        (fmt(OutputKind.JSON_SCHEMA, {"$ref": "#/nowhere"}, "response_format"), "response_format"),
        (fmt(OutputKind.REGEX, "(unclosed", "structured_outputs.regex"), "structured_outputs.regex"),
        (fmt(OutputKind.GRAMMAR, "start: undefined_rule", "guided_grammar"), "guided_grammar"),
        (fmt(OutputKind.REGEX, r"a[^\s\S]", "guided_regex"), "guided_regex"),  # matches nothing
        (dict(tools=(Tool("f", {"type": "object", "properties": {"a": {"type": "bogus"}}}),),
              tool_choice=ToolChoice("required")), "tools"),
    ],
)  # fmt: skip
def test_uncompilable_formats_are_a_400_naming_the_field(checker, kw, param):
    with pytest.raises(APIError) as err:
        checker.grammar_for(request(**kw))
    assert err.value.status == 400 and err.value.param == param


def test_compilable_formats_give_a_grammar(checker):
    assert checker.grammar_for(request()) is None
    assert checker.grammar_for(request(tools=(WEATHER,))) is None  # auto: no constraint
    for kw in (
        dict(output=OutputFormat(OutputKind.JSON_OBJECT)),
        dict(output=OutputFormat(OutputKind.CHOICE, ("a", "b"))),
        dict(tools=(WEATHER,), tool_choice=ToolChoice("function", "get_weather")),
    ):
        assert checker.grammar_for(request(**kw))


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        (dict(tool_choice=ToolChoice("required")), "tool_choice"),
        (dict(tools=(WEATHER,), tool_choice=ToolChoice("function", "nope")), "tool_choice"),
        (dict(tools=(WEATHER,), tool_choice=ToolChoice("sometimes")), "tool_choice"),
        (dict(tools=(Tool("bad name!"),)), "tools.0.function.name"),
        (dict(tools=(WEATHER, WEATHER)), "tools.1.function.name"),
        (dict(sampling=Sampling(logit_bias=(("abc", 1.0),))), "logit_bias.abc"),
        (dict(sampling=Sampling(logit_bias=(("5", 101.0),))), "logit_bias.5"),
        (dict(sampling=Sampling(min_p=-0.1)), "min_p"),
        (dict(sampling=Sampling(presence_penalty=float("nan"))), "presence_penalty"),
    ],
)
def test_bad_tool_and_sampling_fields(kw, param):
    with pytest.raises(APIError) as err:
        check_bounds(request(**kw))
    assert err.value.status == 400 and err.value.param == param


def test_logit_bias_keys_must_be_in_the_vocabulary():
    assert logit_bias_ids((("3", 1.5),), 10) == ((3, 1.5),)
    with pytest.raises(APIError) as err:
        logit_bias_ids((("10", 1.0),), 10)
    assert err.value.param == "logit_bias.10"
