"""The grammar a request's output must match, as one llguidance grammar string: `response_format` and
`structured_outputs` (JSON schema, any JSON object, regex, choice, Lark), or a forced tool call.

Built and checked at the gateway against the model's tokenizer, so a schema the library cannot compile
is a 400 that names the problem before any work starts; the string then travels with the request's
sampling parameters to every worker that samples for it (serving/engine/structured.py).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from serving.api.errors import APIError
from serving.api.requests import GenerateRequest, OutputFormat, OutputKind, Tool
from serving.engine import structured

# Compact JSON with Python's separators (what `json.dumps` and the tool-call template write): a
# sampled model then spends its tokens on values, not on runs of whitespace the schema allows.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_GRAMMAR_CHARS = 64 * 1024
_CACHE_SIZE = 256


def _json_grammar(schema: dict[str, Any]) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_STYLE)  # type: ignore[arg-type]


def output_grammar(fmt: OutputFormat) -> str:
    from llguidance import LLMatcher

    if fmt.kind == OutputKind.JSON_OBJECT:
        return _json_grammar({"type": "object"})
    if fmt.kind == OutputKind.JSON_SCHEMA:
        return _json_grammar(fmt.spec)
    if fmt.kind == OutputKind.REGEX:
        return LLMatcher.grammar_from_regex(fmt.spec)
    if fmt.kind == OutputKind.CHOICE:
        # JSON string literals are Lark string literals: quotes, backslashes and any character kept.
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in fmt.spec))
    return LLMatcher.grammar_from_lark(fmt.spec)


# Keys whose values are JSON data, not schemas: a "$ref" inside them is a value, never rewritten.
_DATA_KEYS = frozenset({"const", "enum", "default", "examples"})
# Keywords whose values map names to schemas.
_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def _call_schema(tool: Tool, index: int, defs: dict[str, Any]) -> dict[str, Any]:
    """One call as the tool-call template writes it: {"name": ..., "arguments": {...}}. Arguments
    whose schema refers into itself (`#`, `#/$defs/...`) are placed under the grammar's root `$defs`
    with those references rewritten, since a reference resolves from the root of the whole schema:
    nested as they are, `#/$defs/x` would point at nothing."""
    arguments, key = tool.parameters, f"tool_{index}_arguments"
    rebased = _rebase(arguments, f"#/$defs/{key}")
    if rebased != arguments:  # it refers into itself
        defs[key] = rebased
        arguments = {"$ref": f"#/$defs/{key}"}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _rebase(schema: Any, root: str, names: bool = False) -> Any:
    """`schema` with every local pointer reference (`#`, `#/...`) made `root...`. `names` says the
    dict is a map of names to schemas (`properties`, `$defs`...), whose keys are never keywords: a
    property called `default` holds a schema like any other."""
    if isinstance(schema, list):
        return [_rebase(v, root) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if names:
            out[k] = _rebase(v, root)
        elif k == "$ref" and isinstance(v, str) and (v == "#" or v.startswith("#/")):
            out[k] = root + v[1:]
        elif k in _DATA_KEYS:
            out[k] = v
        else:
            out[k] = _rebase(v, root, names=k in _NAME_MAPS)
    return out


def tool_call_grammar(tools: tuple[Tool, ...], parallel: bool) -> str:
    """Hermes-style calls, `<tool_call>\\n{json}\\n</tool_call>`, one or (parallel) several, each
    naming one of `tools` with arguments that match its parameters' schema."""
    from llguidance import LLMatcher

    defs: dict[str, Any] = {}
    schemas = [_call_schema(t, i, defs) for i, t in enumerate(tools)]
    body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = {**body, "x-guidance": _JSON_STYLE} | ({"$defs": defs} if defs else {})
    repeat = ' ("\\n" call)*' if parallel else ""
    lines = [
        f"start: call{repeat}",
        'call: "<tool_call>\\n" body "\\n</tool_call>"',
        f"body: %json {json.dumps(body)}",
    ]
    return LLMatcher.grammar_from_lark("\n".join(lines))


def request_grammar(request: GenerateRequest) -> tuple[str, str] | None:
    """(grammar, the field it came from) the request's output must match, or None."""
    choice = request.tool_choice
    forced = bool(request.tools) and choice.mode in ("required", "function")
    if not forced and request.output is None:
        return None
    param = "tools" if forced else request.output.param  # type: ignore[union-attr]
    try:
        if forced:
            tools = request.tools
            if choice.mode == "function":
                tools = tuple(t for t in tools if t.name == choice.name)
            parallel = request.parallel_tool_calls and choice.mode == "required"
            return tool_call_grammar(tools, parallel), param
        return output_grammar(request.output), param  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - whatever the library says of a client's schema is a 400
        raise APIError(400, f"Invalid {param}: {str(exc)[:300]}", param, "invalid_grammar") from None


class GrammarChecker:
    """Checks grammars against the model's tokenizer, remembering the ones that compiled (clients
    send the same schema again and again)."""

    def __init__(self, model_dir: str, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        self._args = (model_dir, vocab_size, eos_token_ids)
        self._check = functools.lru_cache(maxsize=_CACHE_SIZE)(self._compile)

    @functools.cached_property
    def tokenizer(self) -> Any:
        return structured.load_tokenizer(*self._args)

    def _compile(self, grammar: str) -> str | None:
        try:
            return structured.grammar_error(self.tokenizer, grammar)
        except Exception as exc:  # noqa: BLE001 - a grammar the library cannot even check is unusable
            return str(exc) or type(exc).__name__

    def grammar_for(self, request: GenerateRequest) -> str | None:
        """The request's grammar, checked; a 400 naming the field when it cannot be used."""
        found = request_grammar(request)
        if found is None:
            return None
        grammar, param = found
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise APIError(400, f"The {param} is too large (at most {MAX_GRAMMAR_CHARS} characters).", param)
        if error := self._check(grammar):
            raise APIError(
                400, f"The {param} cannot be compiled: {error.strip()[:500]}", param, "invalid_grammar"
            )
        return grammar
