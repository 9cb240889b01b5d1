"""Tool calls in the Hermes style Qwen2.5 uses: the prompt lists the tools, and the model writes each
call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

`template_tools` and `template_messages` give the chat template what Qwen2.5's template expects
(tool definitions, assistant calls with their arguments as objects, tool results). `parse` splits a
finished answer into its text and its calls; `CallStream` does the same incrementally for a stream:
text goes out as it comes, except what could be the start of a call, and each call goes out whole
once its closing tag arrives.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from serving.api.requests import Tool, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def template_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    out = []
    for t in tools:
        function: dict[str, Any] = {"name": t.name}
        if t.description is not None:
            function["description"] = t.description
        function["parameters"] = t.parameters
        out.append({"type": "function", "function": function})
    return out


def template_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """An assistant turn's calls as the template renders them: arguments as an object when they are
    JSON (Qwen's template writes them with `tojson`), else as the text they are."""
    out = []
    for call in calls:
        try:
            arguments: Any = json.loads(call.arguments)
        except ValueError:
            arguments = call.arguments
        out.append(
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}
        )
    return out


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _call(text: str) -> ToolCall | None:
    """A call's body, or None when it is not {"name": str, "arguments": object}."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return None
    arguments = body.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_call_id(), body["name"], json.dumps(arguments, ensure_ascii=False))


def parse(text: str) -> tuple[str, list[ToolCall]]:
    """(the text outside calls, the calls). A block that does not parse as a call stays in the text."""
    stream = CallStream()
    content, calls = stream.feed(text)
    rest, more = stream.finish()
    return content + rest, calls + more


@dataclass
class CallStream:
    """Feed text as it is generated; get back the text to send now and the calls completed.

    Whitespace around calls is layout (the template writes a newline between calls), and so are
    leading and trailing whitespace: none of it is content. Trailing whitespace is held until more
    text shows it is inside the content, so any split of an answer gives the same content."""

    _pending: str = ""  # text held back: a call being written, or what may begin one
    _space: str = ""  # whitespace held back: it may end the content or precede a call
    _started: bool = False  # some content went out
    _after_call: bool = False
    calls: int = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._pending += text
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            start = self._pending.find(OPEN)
            if start < 0:
                keep = _partial_suffix(self._pending, OPEN)
                out.append(self._text(self._pending[: len(self._pending) - keep]))
                self._pending = self._pending[len(self._pending) - keep :]
                break
            end = self._pending.find(CLOSE, start + len(OPEN))
            if end < 0:
                out.append(self._text(self._pending[:start]))
                self._pending = self._pending[start:]
                break
            call = _call(self._pending[start + len(OPEN) : end].strip())
            if call is None:  # not a call after all: it is text
                out.append(self._text(self._pending[: end + len(CLOSE)]))
            else:
                out.append(self._text(self._pending[:start]))
                calls.append(call)
                self._space, self._after_call = "", True
            self._pending = self._pending[end + len(CLOSE) :]
        self.calls += len(calls)
        return "".join(out), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the answer: whatever was held back is text (an unfinished call included)."""
        rest, self._pending = self._pending, ""
        out = self._text(rest)
        self._space = ""
        return out, []

    def _text(self, text: str) -> str:
        if self._after_call or not self._started:
            text = text.lstrip()
        if not text:
            return ""
        text = self._space + text
        body = text.rstrip()
        if not body:
            self._space = text
            return ""
        self._space = text[len(body) :]
        self._started, self._after_call = True, False
        return body


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
