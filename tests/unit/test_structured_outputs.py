"""Constrained decoding in the engine, with the random-weight tiny model: the grammar alone makes every
sampled output valid. Schemas of each kind the issue of structured outputs names (nested objects,
arrays, enums, bounded numbers, required fields), regexes and choices, 50 seeded samples each; the
matcher's state rebuilt by replaying tokens (what a migration does); and a token the grammar forbids
ends the request with an error rather than an invalid answer."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from serving.api.grammars import output_grammar, tool_call_grammar
from serving.api.requests import OutputFormat, OutputKind, Tool
from serving.api.tools import parse
from serving.engine import structured
from serving.engine.inputs import Prompt
from serving.types import FinishReason, Rejected, SamplingParams

SAMPLES = 50

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "invoice": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "maxLength": 6},
                    "paid": {"type": "boolean"},
                    "customer": {
                        "type": "object",
                        "properties": {"name": {"type": "string", "maxLength": 8}},
                        "required": ["name"],
                        "additionalProperties": False,
                    },
                },
                "required": ["id", "paid", "customer"],
                "additionalProperties": False,
            }
        },
        "required": ["invoice"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {"type": "integer", "minimum": -5, "maximum": 5},
                "minItems": 1,
                "maxItems": 4,
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue", "yellow"]},
            "shape": {"type": "string", "enum": ["circle", "square"]},
        },
        "required": ["colour", "shape"],
        "additionalProperties": False,
    },
    "numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
        },
        "required": ["age", "score", "count"],
        "additionalProperties": False,
    },
    "required": {
        "type": "object",
        "properties": {
            "a": {"type": "string", "maxLength": 4},
            "b": {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
            "c": {"type": "boolean"},
        },
        "required": ["a", "c"],
        "additionalProperties": False,
    },
}


def prompt(engine, text: str = "Answer in JSON.") -> Prompt:
    return Prompt(engine.tokenizer.encode_chat([{"role": "user", "content": text}]))


def run(engine, grammar: str, n: int = SAMPLES, max_tokens: int = 160, **kw):
    params = [
        SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1000 + i, grammar=grammar, **kw)
        for i in range(n)
    ]
    return engine.generate([(prompt(engine), p) for p in params])


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_sampled_output_matches_its_schema(engine, name):
    schema = SCHEMAS[name]
    results = run(engine, output_grammar(OutputFormat(OutputKind.JSON_SCHEMA, schema)))
    for r in results:
        assert r.finish_reason == FinishReason.STOP, r.text
        jsonschema.validate(json.loads(r.text), schema)
    assert len({r.text for r in results}) > 1, "seeded samples differ"


def test_any_json_object(engine):
    results = run(engine, output_grammar(OutputFormat(OutputKind.JSON_OBJECT)), n=20, max_tokens=400)
    finished = [r for r in results if r.finish_reason == FinishReason.STOP]
    assert finished, "some objects finish within the budget"
    for r in finished:
        assert isinstance(json.loads(r.text), dict)


def test_regex_and_choice(engine):
    pattern = r"[0-9]{3}-[a-z]{2}( ok)?"
    for r in run(engine, output_grammar(OutputFormat(OutputKind.REGEX, pattern))):
        assert re.fullmatch(pattern, r.text), r.text
    choices = ("yes", "no", 'a "quoted" \\ choice', "ünïcode")
    texts = {r.text for r in run(engine, output_grammar(OutputFormat(OutputKind.CHOICE, choices)))}
    assert texts <= set(choices) and len(texts) > 1


def test_lark_grammar(engine):
    grammar = output_grammar(OutputFormat(OutputKind.GRAMMAR, 'start: "(" num ("+" num)* ")"\nnum: /[1-9]/'))
    for r in run(engine, grammar, n=20):
        assert re.fullmatch(r"\([1-9](\+[1-9])*\)", r.text), r.text


def test_forced_tool_calls_parse_and_match_the_schema(engine):
    weather = {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Rome"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    tools = (Tool("get_weather", weather), Tool("get_time"))
    for parallel in (False, True):
        for r in run(engine, tool_call_grammar(tools, parallel), n=20, max_tokens=200):
            text, calls = parse(r.text)
            assert r.finish_reason == FinishReason.STOP and calls and text == "", r.text
            assert parallel or len(calls) == 1
            for call in calls:
                arguments = json.loads(call.arguments)
                if call.name == "get_weather":
                    jsonschema.validate(arguments, weather)
                else:
                    assert call.name == "get_time" and arguments == {}


def test_replaying_tokens_rebuilds_the_matcher(engine):
    """A migrated request replays its streamed tokens (`Sequence.restore`): the matcher ends in the
    state the original reached, so the next token's mask is the same."""
    schema = SCHEMAS["nested"]
    grammar = output_grammar(OutputFormat(OutputKind.JSON_SCHEMA, schema))
    params = SamplingParams(max_tokens=160, temperature=1.0, seed=7, grammar=grammar)
    tokens = engine.generate([(prompt(engine), params)])[0].token_ids
    vocab = engine.model_config.text.vocab_size
    for k in (1, len(tokens) // 2, len(tokens) - 2):
        replayed = engine.make_sequence("r", prompt(engine), params)
        replayed.restore(tokens[:k])
        direct = structured.new_matcher(engine._grammar_tokenizer(), grammar)
        for t in tokens[:k]:
            structured.consume(direct, t)
        mask = structured.allowed_mask([replayed.matcher, direct], vocab)
        assert (mask[0] == mask[1]).all()
        assert mask[0, tokens[k]], "the token the original sampled next is allowed"


def test_a_token_the_grammar_forbids_is_the_engines_error_never_an_invalid_answer(engine):
    """A token outside the mask (the engine's fault: the sampler masks) ends the request with an error
    that is not blamed on the client's grammar."""
    grammar = output_grammar(OutputFormat(OutputKind.CHOICE, ("yes",)))
    seq = engine.make_sequence("x", prompt(engine), SamplingParams(grammar=grammar))
    wrong = engine.tokenizer.encode_text("no")[0]
    with pytest.raises(ValueError, match="grammar"):
        seq.append(wrong)
    assert seq.output_token_ids == []


def test_a_matcher_that_erred_while_masking_is_not_taken_for_finished(engine):
    """An errored matcher also reports itself stopped: consuming after a limit hit inside the mask
    must raise, not pass the end-of-sequence token as a completed answer."""
    grammar = output_grammar(OutputFormat(OutputKind.REGEX, "a{1000000}"))
    matcher = structured.new_matcher(engine._grammar_tokenizer(), grammar)
    vocab = engine.model_config.text.vocab_size
    allowed = structured.allowed_mask([matcher], vocab)[0].nonzero().flatten().tolist()
    with pytest.raises(Rejected):
        structured.consume(matcher, allowed[-1])  # the first token: past the lexer's limits
    with pytest.raises(Rejected):  # and after it, whatever comes (an EOS included)
        structured.consume(matcher, engine.tokenizer.token_id("<|im_end|>"))


@pytest.mark.parametrize(
    "grammar",
    [
        output_grammar(OutputFormat(OutputKind.REGEX, "a{1000000}")),
        output_grammar(
            OutputFormat(
                OutputKind.JSON_SCHEMA,
                {
                    "$defs": {
                        "a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}, "required": ["x"]}
                    },
                    "$ref": "#/$defs/a",
                },
            )
        ),
    ],
    ids=["million-fold-repeat", "self-requiring-object"],
)
def test_a_grammar_past_the_parser_limits_fails_alone_as_the_clients_400(engine, grammar):
    """Grammars that compile and give a first mask (the gateway's check passes) and then run into
    llguidance's lexer or parser limits at their first token: that request ends with its rejection
    (400 `grammar_too_complex`), not counted as the engine's failure; the request beside it runs on."""
    failed_before = engine.requests_failed
    bad = engine.add_request(prompt(engine), SamplingParams(max_tokens=4, grammar=grammar))
    good = engine.add_request(prompt(engine), SamplingParams(max_tokens=4))
    ends = {}
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.finished:
                ends[delta.request_id] = delta
    assert ends[bad].finish_reason == FinishReason.ERROR
    assert ends[bad].rejection is not None and ends[bad].rejection.code == "grammar_too_complex"
    assert ends[good].finish_reason == FinishReason.LENGTH and ends[good].rejection is None
    assert engine.requests_failed == failed_before


def test_tool_arguments_that_refer_into_their_own_schema_compile_and_match(engine):
    """Parameters with their own `$defs` and a reference to their root (a tree): rebased under the
    call grammar's root, so every forced call parses and validates against the tool's schema as sent."""
    tree = {
        "type": "object",
        "$defs": {"leaf": {"enum": ["x", "y"]}},
        "properties": {
            "value": {"$ref": "#/$defs/leaf"},
            "child": {"anyOf": [{"type": "null"}, {"$ref": "#"}]},
            "note": {"const": {"$ref": "#/not/a/reference"}},
        },
        "required": ["value", "child"],
        "additionalProperties": False,
    }
    for r in run(engine, tool_call_grammar((Tool("walk", tree),), False), n=20, max_tokens=200):
        text, calls = parse(r.text)
        assert r.finish_reason == FinishReason.STOP and len(calls) == 1 and text == "", r.text
        assert calls[0].name == "walk"
        jsonschema.validate(json.loads(calls[0].arguments), tree)
    # Properties named like keywords hold schemas too: their references are rebased.
    keyworded = {
        "type": "object",
        "$defs": {"v": {"enum": [1, 2]}},
        "properties": {"default": {"$ref": "#/$defs/v"}, "enum": {"$ref": "#/$defs/v"}},
        "required": ["default", "enum"],
    }
    grammar = tool_call_grammar((Tool("pick", keyworded),), False)
    assert structured.grammar_error(engine._grammar_tokenizer(), grammar) is None
    # Two such tools side by side: each under its own key.
    both = tool_call_grammar((Tool("walk", tree), Tool("climb", tree)), True)
    assert structured.grammar_error(engine._grammar_tokenizer(), both) is None


def test_an_uncompilable_grammar_fails_the_request_alone(engine):
    bad = SamplingParams(max_tokens=4, grammar=output_grammar(OutputFormat(OutputKind.REGEX, "(")))
    good = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="grammar"):
        engine.add_request(prompt(engine), bad)
    assert engine.generate([(prompt(engine), good)])[0].finish_reason == FinishReason.LENGTH


def test_ignore_eos_after_a_complete_grammar_goes_on_to_max_tokens(engine):
    grammar = output_grammar(OutputFormat(OutputKind.CHOICE, ("yes",)))
    result = engine.generate(
        [(prompt(engine), SamplingParams(max_tokens=6, grammar=grammar, ignore_eos=True))]
    )[0]
    assert result.finish_reason == FinishReason.LENGTH and result.text.startswith("yes")
