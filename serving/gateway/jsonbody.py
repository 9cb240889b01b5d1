"""Request bodies from bytes to JSON values, refusing what the schema layer should never see: invalid
JSON or encodings, NaN / Infinity literals, nesting deeper than `MAX_DEPTH`, and strings that are not
valid Unicode (lone UTF-16 surrogates, which JSON's `\\ud800` escapes can spell and which no tokenizer
can encode). Each refusal is a 400 with an OpenAI error object; nothing recurses on client input."""

from __future__ import annotations

import json
from typing import Any

from serving.api.errors import APIError

MAX_DEPTH = 64  # arrays and objects inside each other; OpenAI bodies need fewer than 10


def _no_constants(name: str) -> Any:
    raise APIError(
        400, f"The request body is not valid JSON ({name} is not a JSON value).", code="invalid_json"
    )


def parse_body(raw: bytes) -> Any:
    """JSON bytes → value, or a 400 APIError."""
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:  # the C scanner's own guard; deeper than the interpreter allows
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
    check_value(data)
    return data


def check_value(data: Any) -> None:
    """Walk a parsed value without recursion: depth and Unicode."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise _too_deep()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                if isinstance(item, str | dict | list):
                    stack.append((item, depth + 1))


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        message = "The request body contains text that is not valid Unicode (a lone surrogate)."
        raise APIError(400, message, code="invalid_unicode") from None


def _too_deep() -> APIError:
    return APIError(400, f"The request body is nested deeper than {MAX_DEPTH} levels.", code="invalid_json")
