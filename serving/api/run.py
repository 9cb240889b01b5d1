"""One admitted request's choices running through the pipeline, as one stream of typed events.

Each of the `n` choices (per prompt) is its own pipeline request, run as a task; their deltas are
merged into one stream in arrival order. The stream's first event is awaited before a front end
answers (`prime`), so "no worker for a stage" is a 503 / UNAVAILABLE rather than an answer that
begins and then fails. `close` ends everything: unfinished choices are cancelled on every worker
they touched and counted as aborts, and the admission ticket is released.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serving.api.admission import Ticket
from serving.api.errors import APIError, timed_out, unavailable
from serving.pipeline import Pipeline
from serving.pipeline import Request as PipelineRequest
from serving.telemetry.metrics import Metrics
from serving.types import (
    FinishReason,
    NoWorkerAvailable,
    PromptSpec,
    SamplingParams,
    StageTimings,
    TokenDelta,
)


@dataclass
class Choice:
    """One choice of a request as it runs: its own pipeline request and what it produced."""

    index: int
    spec: PromptSpec
    params: SamplingParams
    images: list = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    timings: StageTimings = field(default_factory=StageTimings)
    failed_stage: str = "gateway"  # for the error metrics, when finish_reason is ERROR


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int  # images' and videos' tokens together
    video_tokens: int = 0  # of which videos'
    pruned_tokens: int = 0  # visual tokens pruning at the encoder took out (not in image_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def failed_stage(delta: TokenDelta) -> str:
    """Which stage failed a request, as the failure itself said (a typed field, never its message);
    "gateway" when nothing past the gateway did."""
    return delta.failed_stage.name.lower() if delta.failed_stage is not None else "gateway"


class Generation:
    def __init__(
        self,
        pipeline: Pipeline,
        metrics: Metrics,
        request_id: str,
        choices: list[Choice],
        arrival: float,
        queue_s: float,
        ticket: Ticket,
        timeout_s: float,
    ) -> None:
        self.pipeline, self.metrics = pipeline, metrics
        self.request_id, self.choices = request_id, choices
        self.arrival, self.queue_s, self.ticket, self.timeout_s = arrival, queue_s, ticket, timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self._runs = self._run()
        self._first: tuple[Choice, TokenDelta] | None = None

    async def prime(self) -> None:
        """Await the first event; a failure there ends the generation and raises an APIError."""
        try:
            self._first = await self._next()
        except BaseException:
            await self.close()
            raise

    async def events(self) -> AsyncIterator[tuple[Choice, TokenDelta]]:
        """(choice, delta) as they come, until every choice finished; APIError for a timeout or for no
        worker able to take a stage. The deadline bounds each wait, never the consumer's own work."""
        first, self._first = self._first, None
        if first is not None:
            yield first
        while (item := await self._next()) is not None:
            yield item

    async def close(self) -> None:
        await self._runs.aclose()  # type: ignore[attr-defined]
        self.ticket.release()

    @property
    def failed(self) -> Choice | None:
        return next((c for c in self.choices if c.finish_reason == FinishReason.ERROR), None)

    async def _next(self) -> tuple[Choice, TokenDelta] | None:
        try:
            async with asyncio.timeout_at(self.deadline):
                item = await anext(self._runs, None)
        except TimeoutError:
            raise timed_out() from None
        except NoWorkerAvailable as exc:
            raise unavailable(exc) from None
        if item is not None and (r := item[1].rejection) is not None:
            # The client's media failed past the gateway (they did not decode): its 4xx, as if the
            # gateway had found it.
            raise APIError(r.status, r.message, r.param, r.code, stage=failed_stage(item[1]))
        return item

    async def _run(self) -> AsyncIterator[tuple[Choice, TokenDelta]]:
        """Every choice's deltas as they come; closing it cancels every choice's pipeline."""
        events: asyncio.Queue = asyncio.Queue()
        done = object()

        async def run_choice(choice: Choice) -> None:
            request = PipelineRequest(
                f"{self.request_id}-{choice.index}",
                choice.spec,
                choice.params,
                choice.images,
                arrival=self.arrival,
                deadline_s=self.timeout_s,
            )
            try:
                async for delta in self.pipeline.run(request):
                    await events.put((choice, delta))
            except NoWorkerAvailable as exc:
                await events.put(exc)  # re-raised by the consumer: a 503, not an empty answer
            finally:
                await events.put(done)

        tasks = [asyncio.create_task(run_choice(c)) for c in self.choices]
        try:
            remaining = len(tasks)
            while remaining:
                item = await events.get()
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, NoWorkerAvailable):
                    raise item
                choice, delta = item
                self._record(choice, delta)
                yield choice, delta
        finally:
            for task in tasks:
                task.cancel()
            # Choices the gateway stopped (client gone, timeout) end as aborts, in the metrics too:
            # recorded before the wait below, which a second cancellation of a request whose client
            # left (the server's and the HTTP framework's) can cut short.
            for choice in self.choices:
                if choice.finish_reason is None:
                    abort = TokenDelta(f"{self.request_id}-{choice.index}", [], "", FinishReason.ABORT)
                    self._record(choice, abort)
            await asyncio.gather(*tasks, return_exceptions=True)

    def _record(self, choice: Choice, delta: TokenDelta) -> None:
        now = time.perf_counter()
        if delta.token_ids:
            choice.first_token_at = choice.first_token_at or now
            choice.token_times.extend([now] * len(delta.token_ids))
        choice.token_ids.extend(delta.token_ids)
        choice.text.append(delta.text)
        choice.logprobs.extend(delta.logprobs or [])
        if delta.finished:
            timings = delta.timings or StageTimings()
            choice.finish_reason, choice.error, choice.timings = delta.finish_reason, delta.error, timings
            if delta.finish_reason == FinishReason.ERROR:
                choice.failed_stage = failed_stage(delta)
            # The one call that accounts a finished request (both front ends come through here).
            self.metrics.observe_request(
                arrival=self.arrival,
                first_token=choice.first_token_at,
                end=now,
                token_times=choice.token_times,
                prompt_tokens=len(choice.spec.token_ids),
                output_tokens=len(choice.token_ids),
                finish_reason=str(delta.finish_reason),
                timings=timings,
                queue_s=self.queue_s,
            )
