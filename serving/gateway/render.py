"""OpenAI renderings of a generation: the JSON answer, the SSE chunks, usage and logprobs. `kind` is
"chat" (chat.completion) or "text" (text_completion)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from serving.api.run import Choice, Usage

Decode = Callable[..., str]


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": usage.image_tokens},
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


def final_body(
    kind: str,
    request_id: str,
    model: str,
    choices: list[Choice],
    usage: Usage,
    decode: Decode,
    token_bytes: Callable[[int], bytes] | None = None,
) -> dict[str, Any]:
    out = []
    for c in sorted(choices, key=lambda c: c.index):
        text = "".join(c.text)
        entry: dict[str, Any] = {
            "index": c.index,
            "finish_reason": str(c.finish_reason),
            "logprobs": logprobs_body(kind, c.logprobs, decode, c.params.logprobs or 0, token_bytes),
        }
        if kind == "chat":
            entry["message"] = {"role": "assistant", "content": text}
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

    def chunk(self, index: int, content: str | None, finish: str | None, role: bool = False) -> str:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if content:
                delta["content"] = content
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
