"""`epd eval` against any OpenAI-compatible server: every item as a chat completion, `concurrency` in
flight, each reply scored. A failed request is an error outcome (scored wrong), never a crash."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from serving.evals.report import Outcome, Report
from serving.evals.requests import chat_body
from serving.evals.tasks import Item


async def _ask(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], item: Item, headers: dict[str, str]
) -> Outcome:
    outcome = Outcome(item.task, item.index, item.answer)
    try:
        r = await client.post(url, json=body, headers=headers)
    except httpx.HTTPError as e:
        outcome.error = f"connection: {type(e).__name__}"
        return outcome
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        outcome.error = f"http {r.status_code}: {message}"
        return outcome
    data = r.json()
    outcome.reply = data["choices"][0]["message"].get("content") or ""
    outcome.prompt_tokens = int((data.get("usage") or {}).get("prompt_tokens", 0))
    return outcome


async def evaluate_served(
    base_url: str,
    model: str,
    items: list[Item],
    seed: int,
    extra: dict[str, Any] | None = None,
    concurrency: int = 8,
    api_key: str | None = None,
    timeout_s: float = 300.0,
) -> Report:
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def one(item: Item) -> Outcome:
            async with slots:
                return await _ask(client, url, chat_body(item, model, extra), item, headers)

        outcomes = await asyncio.gather(*(one(i) for i in items))
    return Report(model, seed, base_url, list(outcomes), time.perf_counter() - start, dict(extra or {}))
