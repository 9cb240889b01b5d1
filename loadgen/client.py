"""The load client: streams chat completions from any OpenAI-compatible server and times each token."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx

from loadgen.workloads import ImageMaker, WorkloadRequest
from serving.evals.requests import media_part
from serving.evals.score import answer_of


@dataclass
class Record:
    """One request as the client saw it. Times are seconds on the client's clock."""

    index: int
    arrival: float  # when the request was sent
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per content chunk
    end: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    image_tokens: int = 0  # images' and videos' (the server's usage)
    video_tokens: int = 0
    images: int = 0  # media items sent, images and videos
    warmup: bool = False
    error: str | None = None
    text: str = ""
    expected: str | None = None  # the known right answer, when the workload has one
    correct: bool = False  # the reply's answer is the expected one (a failed request is not)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Target:
    base_url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 600.0


def chat_body(target: Target, req: WorkloadRequest, images: ImageMaker) -> dict:
    content: list[dict] = [media_part(url) for url in req.media_urls]
    content += [
        {"type": "image_url", "image_url": {"url": images.data_url(size, seed)}}
        for size, seed in zip(req.image_sizes, req.image_seeds, strict=True)
    ]
    content.append({"type": "text", "text": req.prompt})
    body = {
        "model": target.model,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": req.output_tokens,
        "temperature": 0,
    }
    if req.answer is None:
        # vLLM's extensions, which EPD Serve honours: the output length is what the workload says. A
        # request with a known answer ends where the model ends it, so its reply can be scored.
        body.update(ignore_eos=True, min_tokens=req.output_tokens)
    return body


async def send(
    client: httpx.AsyncClient,
    target: Target,
    index: int,
    req: WorkloadRequest,
    images: ImageMaker,
    clock: Callable[[], float] = time.perf_counter,
    warmup: bool = False,
) -> Record:
    body = chat_body(target, req, images)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    images_sent = len(req.image_sizes) + len(req.media_urls)
    record = Record(index, clock(), images=images_sent, warmup=warmup, expected=req.answer)
    try:
        async with client.stream(
            "POST", f"{target.base_url}/chat/completions", json=body, headers=headers
        ) as r:
            if r.status_code != 200:
                await r.aread()
                record.error = f"http_{r.status_code}"
                return record
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = clock()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = "stream_error"
                    break
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    details = chunk["usage"].get("prompt_tokens_details") or {}
                    record.image_tokens = details.get("image_tokens") or 0
                    record.video_tokens = details.get("video_tokens") or 0
                texts = [c.get("delta", {}).get("content") for c in chunk.get("choices", [])]
                if any(texts):
                    record.first_token = record.first_token or now
                    record.token_times.append(now)
                    record.text += "".join(t for t in texts if t)
        record.end = clock()
        if record.error is None and record.first_token is None:
            record.error = "no_tokens"
        record.correct = record.error is None and answer_of(record.text) == req.answer
    except httpx.TimeoutException:
        record.error = "timeout"
    except httpx.HTTPError:
        record.error = "connection"
    return record


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.done, self.label = total, 0, label

    def step(self) -> None:
        self.done += 1
        filled = int(30 * self.done / self.total)
        print(
            f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}",
            end="",
            file=sys.stderr,
        )
        if self.done == self.total:
            print(file=sys.stderr)


async def run(
    target: Target,
    requests: list[WorkloadRequest],
    offsets: list[float] | None,
    concurrency: int | None,
    warmup: int = 0,
    duration_s: float | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Record]:
    """Open loop (each request at its offset, whatever is in flight) or closed loop (`concurrency`
    requests in flight). The first `warmup` requests run first and are marked, not measured."""
    images = ImageMaker()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=target.timeout_s, limits=limits) as client:
        warm = [
            await send(client, target, i, r, images, clock, warmup=True)
            for i, r in enumerate(requests[:warmup])
        ]
        measured = requests[warmup:]
        bar = Progress(len(measured), "requests") if progress and measured else None
        start = clock()

        async def one(i: int, req: WorkloadRequest) -> Record:
            record = await send(client, target, warmup + i, req, images, clock)
            if bar:
                bar.step()
            return record

        if concurrency:
            slots = asyncio.Semaphore(concurrency)

            async def closed(i: int, req: WorkloadRequest) -> Record | None:
                async with slots:
                    if duration_s is not None and clock() - start > duration_s:
                        return None
                    return await one(i, req)

            results = await asyncio.gather(*(closed(i, r) for i, r in enumerate(measured)))
        else:
            assert offsets is not None

            async def opened(i: int, req: WorkloadRequest) -> Record | None:
                delay = offsets[i] - (clock() - start)
                if duration_s is not None and offsets[i] > duration_s:
                    return None
                if delay > 0:
                    await asyncio.sleep(delay)
                return await one(i, req)

            results = await asyncio.gather(*(opened(i, r) for i, r in enumerate(measured)))
    return warm + [r for r in results if r is not None]
