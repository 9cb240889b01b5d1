"""OpenAI renderings of a generation: the JSON answer, the SSE chunks, usage and logprobs. `kind` is
"chat" (chat.completion) or "text" (text_completion)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from serving.api import tools
from serving.api.requests import ToolCall
from serving.api.run import Choice, Usage
from serving.types import FinishReason

Decode = Callable[..., str]


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "image_tokens": usage.image_tokens,  # images' and videos' tokens
            "video_tokens": usage.video_tokens,  # of which videos'
            **({"pruned_visual_tokens": usage.pruned_tokens} if usage.pruned_tokens else {}),
        },
    }


def logprobs_body(
    kind: str,
    entries: list[dict[int, float]],
    decode: Decode,
    top: int = 0,
    token_bytes: Callable[[int], bytes] | None = None,
) -> dict[str, Any] | None:
    """Each entry is the engine's: the chosen token's logprob first, then the `top` most likely tokens.
    It is a dict, so the chosen token appears once even when it is among them: the `top` best of the
    entry, by logprob, are the top list (taking all but the first would drop the chosen one then)."""
    if not entries:
        return None

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = decode([token_id], skip_special_tokens=False)
        raw = token_bytes(token_id) if token_bytes else text.encode()  # a part of a character too
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    def best(entry: dict[int, float]) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[:top]

    if kind == "chat":
        content = []
        for entry in entries:
            (token_id, logprob), *_ = entry.items()
            content.append(item(token_id, logprob) | {"top_logprobs": [item(t, lp) for t, lp in best(entry)]})
        return {"content": content}
    tokens = [decode([next(iter(e))], skip_special_tokens=False) for e in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [next(iter(e.values())) for e in entries],
        "top_logprobs": [{decode([t], skip_special_tokens=False): lp for t, lp in best(e)} for e in entries],
    }


def call_body(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A tool call as OpenAI writes it; with `index`, as a streamed delta (the whole call at once)."""
    body: dict[str, Any] = {"id": call.id, "type": "function"}
    body["function"] = {"name": call.name, "arguments": call.arguments}
    return body if index is None else {"index": index} | body


def finish_reason(reason: FinishReason | None, made_calls: bool) -> str | None:
    """OpenAI's reason: `tool_calls` when the answer ended by itself after making calls."""
    if reason is None:
        return None
    return "tool_calls" if made_calls and reason == FinishReason.STOP else str(reason)


def final_body(
    kind: str,
    request_id: str,
    model: str,
    choices: list[Choice],
    usage: Usage,
    decode: Decode,
    token_bytes: Callable[[int], bytes] | None = None,
    parse_calls: bool = False,
) -> dict[str, Any]:
    """`parse_calls`: the request offered tools, so tool calls are read out of each answer."""
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        text = "".join(c.text)
        calls: list[ToolCall] = []
        if parse_calls:
            text, calls = tools.parse(text)
        entry: dict[str, Any] = {
            "index": c.index,
            "finish_reason": finish_reason(c.finish_reason, bool(calls)),
            "logprobs": logprobs_body(kind, c.logprobs, decode, c.params.logprobs or 0, token_bytes),
        }
        if kind == "chat":
            entry["message"] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                entry["message"]["tool_calls"] = [call_body(call) for call in calls]
        else:
            entry["text"] = text
        out.append(entry)
    return {
        "id": request_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": usage_body(usage),
    }


class Chunks:
    """The SSE events of one streamed answer."""

    def __init__(self, kind: str, request_id: str, model: str, include_usage: bool) -> None:
        self.kind, self.request_id, self.model, self.include_usage = kind, request_id, model, include_usage
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(
        self,
        index: int,
        content: str | None,
        finish: str | None,
        role: bool = False,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> str:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if content:
                delta["content"] = content
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": index, "text": content or "", "finish_reason": finish, "logprobs": None}
        payload: dict[str, Any] = self._envelope() | {"choices": [choice]}
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)

    def usage(self, usage: Usage) -> str:
        return sse(self._envelope() | {"choices": [], "usage": usage_body(usage)})

    def _envelope(self) -> dict[str, Any]:
        return {"id": self.request_id, "object": self.object, "created": self.created, "model": self.model}


def call_chunks(
    chunks: Chunks, stream: tools.CallStream, index: int, text: str, reason: FinishReason | None
) -> str:
    """The SSE events for one streamed delta of an answer that may make tool calls: the text that
    cannot be part of a call, each call once complete, and the finish (`tool_calls` after calls)."""
    content, calls = stream.feed(text)
    if reason is not None:
        rest, _ = stream.finish()
        content += rest
    first = stream.calls - len(calls)
    deltas = [call_body(call, first + k) for k, call in enumerate(calls)]
    out = chunks.chunk(index, content, None, tool_calls=deltas) if content or deltas else ""
    if reason is not None:
        out += chunks.chunk(index, None, finish_reason(reason, stream.calls > 0))
    return out
