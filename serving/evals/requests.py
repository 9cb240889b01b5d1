"""A shapes-world item as an OpenAI chat request: one user message, the media part first, then the
text; greedy, at most 8 tokens (the scoring rules in docs/evals.md)."""

from __future__ import annotations

import base64
import copy
from typing import Any

from serving.evals.tasks import Item

MAX_TOKENS = 8


def data_url(item: Item) -> str:
    return f"data:{item.mime};base64," + base64.b64encode(item.media).decode()


def media_part(url: str) -> dict[str, Any]:
    """An `image_url` part, or a `video_url` part for a video data URL."""
    if url.startswith("data:video/"):
        return {"type": "video_url", "video_url": {"url": url}}
    return {"type": "image_url", "image_url": {"url": url}}


def messages(item: Item) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [media_part(data_url(item)), {"type": "text", "text": item.prompt}]}]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` merged into a copy of `base`, nested objects merged key by key (so an `--extra` of
    `{"mm_processor_kwargs": {...}}` adds to the body rather than replacing what is there)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def chat_body(item: Item, model: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"model": model, "messages": messages(item), "temperature": 0, "max_tokens": MAX_TOKENS}
    return merge(body, extra or {})
