"""The one place a request's whole path is visible: E → P → D across the live pool directory.

  1. P: pick a prefill worker. If it also decodes, the request stays there (`generate`).
  2. E (when the request has images): the P worker encodes them itself if it has the E role;
     otherwise an encode worker does and P pulls the embeddings.
  3. P prefills and returns the first token with a KV lease; D pulls the KV and streams the rest.
Each leg picks from the workers routed for its role now, so role switches apply to the next leg.

Failures (docs/architecture.md, "Failure semantics"):
  - E or P fails: the leg is redone on another worker (never the one that failed), E with it when P
    already pulled the embeddings; with no worker able, the pipeline waits for one until the
    request's deadline, then raises NoWorkerAvailable (the gateway answers 503).
  - D fails after tokens were streamed: the request migrates. P re-prefills prompt + streamed tokens,
    another D replays them into its stop rules and goes on; the client sees one stream with the tokens
    an undisturbed run gives. A migration limit per request; each failure path cancels the request on
    every surviving worker it touched, at once.
  - A failure inside the request itself (RequestFailed) ends it with an error: redoing it would fail.
This module imports neither torch nor Ray: workers are reached through typed handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from serving.control.directory import PoolDirectory, WorkerEntry
from serving.types import (
    FinishReason,
    MediaItem,
    NoWorkerAvailable,
    PromptSpec,
    Rejected,
    Rejection,
    RequestFailed,
    Role,
    SamplingParams,
    StageTimings,
    TokenDelta,
    WorkerDied,
    WorkerError,
    failure_of,
)

if TYPE_CHECKING:
    from serving.stages.handles import WorkerHandle

T = TypeVar("T")
log = logging.getLogger(__name__)
_WAIT_POLL_S = 0.05
_CANCEL_TIMEOUT_S = 5.0
AFFINITY_PREFIX_TOKENS = 256  # the prompt tokens a prefill affinity key covers


@dataclass
class Request:
    request_id: str
    spec: PromptSpec
    params: SamplingParams
    images: list[MediaItem | np.ndarray] = field(default_factory=list)  # planned items, or pixels
    arrival: float = field(default_factory=time.perf_counter)
    deadline_s: float = 600.0  # from arrival: how long the request may wait for a worker, in all

    @functools.cached_property
    def media_key(self) -> str | None:
        """What the request's media are, for encode affinity: the least of its items' keys (a planned
        item's own; for pixels, a hash of their shape and a stride of them: cheap, and a collision
        costs a cache miss, never a wrong answer). The least, not all together: two requests that
        share an item often share it, and one worker's cache serves the item whichever other items
        come with it."""
        if not self.images:
            return None
        keys = []
        for item in self.images:
            if isinstance(item, MediaItem):
                keys.append(item.key)
                continue
            digest = hashlib.blake2b(str(item.shape).encode(), digest_size=16)
            digest.update(np.ascontiguousarray(item.reshape(-1)[::61]).tobytes())
            keys.append(digest.hexdigest())
        return min(keys)

    @functools.cached_property
    def prefix_key(self) -> str:
        """What the prompt begins with (its first tokens and its media), for prefill affinity: the
        same prefix meets the worker whose prefix cache holds it."""
        head = np.asarray(self.spec.token_ids[:AFFINITY_PREFIX_TOKENS], dtype=np.int64).tobytes()
        return hashlib.blake2b(head + (self.media_key or "").encode(), digest_size=16).hexdigest()


@dataclass
class PipelineCounters:
    """What the orchestrator saw go wrong; exported by the gateway's metrics."""

    migrations: int = 0
    retries: dict[str, int] = field(default_factory=lambda: {r.name.lower(): 0 for r in Role})
    failures: dict[str, int] = field(default_factory=lambda: {r.name.lower(): 0 for r in Role})
    unavailable: dict[str, int] = field(default_factory=lambda: {r.name.lower(): 0 for r in Role})


@dataclass
class _Attempt:
    """The workers one try of a request touched, to cancel it on them if the try fails."""

    touched: dict[str, WorkerHandle] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)


class Pipeline:
    def __init__(
        self,
        directory: PoolDirectory,
        on_worker_died: Callable[[str], None] | None = None,
        max_leg_attempts: int = 3,
        max_migrations: int = 2,
        wait_for_worker_s: float = 10.0,
    ) -> None:
        self.directory = directory
        self._on_worker_died = on_worker_died or (lambda name: None)
        self.max_leg_attempts = max_leg_attempts
        self.max_migrations = max_migrations
        self.wait_for_worker_s = wait_for_worker_s
        self.counters = PipelineCounters()

    async def run(self, request: Request) -> AsyncIterator[TokenDelta]:
        """Token deltas of one request; the last one carries the per-stage timings."""
        streamed: list[int] = []  # every token the caller has been given
        timings = StageTimings()
        migrations = 0
        while True:
            attempt = _Attempt()
            finished = False
            try:
                async for delta in self._attempt(request, streamed, attempt):
                    timings.merge(delta.timings)
                    streamed.extend(delta.token_ids)
                    finished = delta.finished
                    if finished:
                        timings.e2e_s = time.perf_counter() - request.arrival
                        timings.migrations = migrations
                        delta.timings = timings
                    else:
                        delta.timings = None
                    yield delta
                    if finished:
                        return
                raise WorkerError("the stream ended without finishing")
            except RequestFailed as exc:
                # A stream's own failure is its prefill's until a token came out, its decode's after.
                stage = exc.stage or (Role.DECODE if streamed else Role.PREFILL)
                rejection = exc.rejection if isinstance(exc, Rejected) else None
                if stage is not Role.ENCODE and rejection is None:  # the encode leg counted its own
                    self.counters.failures[stage.name.lower()] += 1
                yield self._error(request, str(exc) or "the request failed", stage, rejection)
                return
            except NoWorkerAvailable as exc:
                if not streamed:
                    raise
                yield self._error(request, str(exc), exc.stage)
                return
            except WorkerError as exc:
                # A worker streaming the request failed: continue the stream elsewhere.
                migrations += 1
                if migrations > self.max_migrations:
                    self.counters.failures["decode"] += 1
                    yield self._error(request, "the decode stage failed", Role.DECODE)
                    return
                if streamed:
                    self.counters.migrations += 1
                log.warning(
                    "request %s moves to another worker (%d): %s", request.request_id, migrations, exc
                )
            finally:
                if not finished:
                    await self._cancel(request.request_id, attempt)

    async def _attempt(
        self, request: Request, streamed: list[int], attempt: _Attempt
    ) -> AsyncIterator[TokenDelta]:
        """One try: E and P (redone on other workers as needed), then D. `streamed` non-empty means
        a migration: recompute their KV and go on after them."""
        resume = list(streamed) or None
        front = await self._front(request, resume, attempt)
        if isinstance(front, _Colocated):
            async for delta in self._stream(front.worker, attempt, front.stream):
                yield delta
            return
        if resume is None:
            front.delta.timings = front.timings
            yield front.delta  # the first token, before decode has even started
        if front.kv is None:
            return
        d = await self._pick(Role.DECODE, frozenset(), request)
        stream = d.handle.decode(request.request_id, request.spec, request.params, front.kv, resume)
        async for delta in self._stream(d, attempt, stream):
            yield delta

    async def _front(self, request: Request, resume: list[int] | None, attempt: _Attempt) -> Any:
        """E and P with retries: a PrefillResult from a P worker, or a colocated stream."""
        tried: set[str] = set()
        for n in range(self.max_leg_attempts):
            p = await self._pick(Role.PREFILL, frozenset(tried), request)
            tried.add(p.name)
            try:
                embeddings, local_images = None, None
                if request.images and Role.ENCODE in p.routing:
                    local_images = request.images
                elif request.images:
                    embeddings = await self._encode(request, attempt)
                args = (request.request_id, request.spec, request.params, embeddings, local_images, resume)
                if Role.DECODE in p.routing:
                    return _Colocated(p, p.handle.generate(*args))
                attempt.touched[p.name] = p.handle
                return await self._leg(p, p.handle.prefill(*args))
            except RequestFailed:
                raise
            except WorkerError as exc:
                self._count_retry(Role.PREFILL, p, exc, attempt)
                await self._cancel(request.request_id, attempt)  # E's lease too: redo both
                attempt.touched.clear()
                if n == self.max_leg_attempts - 1:
                    self.counters.failures["prefill"] += 1
                    raise RequestFailed("the prefill stage failed", Role.PREFILL) from exc
        raise AssertionError("unreachable")

    async def _encode(self, request: Request, attempt: _Attempt) -> Any:
        tried: set[str] = set()
        for n in range(self.max_leg_attempts):
            e = await self._pick(Role.ENCODE, frozenset(tried), request)
            tried.add(e.name)
            attempt.touched[e.name] = e.handle
            try:
                call = e.handle.encode(request.request_id, request.images, request.spec.keep)
                return await self._leg(e, call)
            except Rejected:
                raise  # the client's media, not the stage, failed
            except RequestFailed:
                self.counters.failures["encode"] += 1
                raise
            except WorkerError as exc:
                self._count_retry(Role.ENCODE, e, exc, attempt)
                if e.name not in attempt.dead:
                    await _quiet(e.handle.cancel(request.request_id))
                attempt.touched.pop(e.name, None)
                if n == self.max_leg_attempts - 1:
                    self.counters.failures["encode"] += 1
                    raise RequestFailed("the encode stage failed", Role.ENCODE) from exc
        raise AssertionError("unreachable")

    async def _pick(self, role: Role, exclude: frozenset[str], request: Request) -> WorkerEntry:
        """A worker routed for `role` now; waits for one (a replacement, a switch) until the deadline.
        Encode and prefill prefer the worker the request's content hashes to (its caches may hold
        it), within a bounded load (`PoolDirectory.pick`)."""
        give_up = min(request.arrival + request.deadline_s, time.perf_counter() + self.wait_for_worker_s)
        key = {Role.ENCODE: request.media_key, Role.PREFILL: request.prefix_key}.get(role)
        while (entry := self.directory.pick(role, exclude, key)) is None:
            if exclude and self.directory.pick(role) is not None:
                exclude = frozenset()  # every able worker failed this leg once: one may have recovered
                continue
            # Nothing can take the stage and nothing that could is on its way: a 503 now, not later.
            if time.perf_counter() >= give_up or not self.directory.coming(role):
                self.counters.unavailable[role.name.lower()] += 1
                raise NoWorkerAvailable(role)
            await asyncio.sleep(_WAIT_POLL_S)
        return entry

    @contextlib.contextmanager
    def _busy(self, worker: WorkerEntry) -> Iterator[None]:
        """Count a leg in flight on `worker`, for least-loaded picking."""
        outstanding = self.directory.outstanding
        outstanding[worker.name] = outstanding.get(worker.name, 0) + 1
        try:
            yield
        finally:
            outstanding[worker.name] = outstanding.get(worker.name, 1) - 1

    async def _leg(self, worker: WorkerEntry, call: Awaitable[T]) -> T:
        with self._busy(worker):
            return await call

    async def _stream(
        self, worker: WorkerEntry, attempt: _Attempt, stream: AsyncIterator[TokenDelta]
    ) -> AsyncIterator[TokenDelta]:
        attempt.touched[worker.name] = worker.handle
        try:
            with self._busy(worker):
                async for delta in stream:
                    if delta.finish_reason == FinishReason.ERROR:
                        raise failure_of(delta, "the request failed", delta.failed_stage)
                    if delta.finish_reason == FinishReason.ABORT:
                        raise WorkerError(f"worker {worker.name} aborted the request")
                    yield delta
        except WorkerDied:
            attempt.dead.add(worker.name)
            self._on_worker_died(worker.name)
            raise
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    def _count_retry(self, role: Role, worker: WorkerEntry, exc: Exception, attempt: _Attempt) -> None:
        self.counters.retries[role.name.lower()] += 1
        log.warning("%s leg failed on %s, retrying elsewhere: %s", role.name.lower(), worker.name, exc)
        if isinstance(exc, WorkerDied):
            attempt.dead.add(worker.name)
            self._on_worker_died(worker.name)

    async def _cancel(self, request_id: str, attempt: _Attempt) -> None:
        """Free the request on every surviving worker this try touched, all at once."""
        alive = [h for name, h in attempt.touched.items() if name not in attempt.dead]
        if alive:
            await asyncio.shield(asyncio.gather(*(_quiet(h.cancel(request_id)) for h in alive)))

    @staticmethod
    def _error(request: Request, message: str, stage: Role, rejection: Rejection | None = None) -> TokenDelta:
        timings = StageTimings(e2e_s=time.perf_counter() - request.arrival)
        return TokenDelta(
            request.request_id,
            [],
            "",
            FinishReason.ERROR,
            error=message,
            timings=timings,
            failed_stage=stage,
            rejection=rejection,
        )


@dataclass
class _Colocated:
    """A P worker that also decodes: the request runs start to end there."""

    worker: WorkerEntry
    stream: AsyncIterator[TokenDelta]


async def _quiet(call: Awaitable[Any]) -> None:
    with contextlib.suppress(Exception):  # best effort, bounded: the worker may be dying too
        async with asyncio.timeout(_CANCEL_TIMEOUT_S):
            await call
