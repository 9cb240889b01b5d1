"""The one place a request's whole path is visible: E → P → D across worker pools.

  1. E (when the topology has an encode pool and the request has images): embeddings under a lease.
  2. P: pulls the embeddings (or encodes itself), prefills, returns the first token and a KV lease.
  3. D: pulls the KV, decodes in its continuous batch, streams token deltas.
Colocated topologies hand the adjacent stages to one worker. E and P are retried once on another
worker; a failed D ends the request with an error. Cancelling the consumer frees every stage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.stages.handles import Pool, WorkerHandle
from serving.types import FinishReason, PromptSpec, SamplingParams, TokenDelta

TOPOLOGIES: dict[str, tuple[str, ...]] = {
    # topology → the role sets of its pools, in request order
    "e+p+d": ("e", "p", "d"),
    "ep+d": ("ep", "d"),
    "e+pd": ("e", "pd"),
    "epd": ("epd",),
}


@dataclass
class Request:
    request_id: str
    spec: PromptSpec
    params: SamplingParams
    images: list[np.ndarray] = field(default_factory=list)
    arrival: float = field(default_factory=time.perf_counter)


class Pipeline:
    def __init__(self, topology: str, pools: dict[str, Pool]) -> None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; choose from {sorted(TOPOLOGIES)}")
        self.topology = topology
        self.pools = pools
        roles = TOPOLOGIES[topology]
        self.encode_pool = pools["e"] if "e" in roles else None
        self.prefill_pool = pools[next(r for r in roles if "p" in r)]
        self.decode_pool = pools["d"] if "d" in roles else None  # None: prefill workers decode too

    async def run(self, request: Request) -> AsyncIterator[TokenDelta]:
        """Token deltas of one request; the last one carries the per-stage timings in `extra`."""
        involved: list[WorkerHandle] = []
        timings: dict[str, float] = {}
        finished = False
        try:
            embeddings = None
            if request.images and self.encode_pool is not None:
                embeddings = await self._retry(
                    self.encode_pool, involved, "encode", request.request_id, request.images
                )
                timings.update(embeddings.timings)
            local_images = request.images if embeddings is None else None
            args = (request.request_id, request.spec, request.params, embeddings, local_images)
            if self.decode_pool is None:
                stream = self._stream(self.prefill_pool.pick(), involved, "generate", *args)
            else:
                result = await self._retry(self.prefill_pool, involved, "prefill", *args)
                timings.update(result.timings)
                first = result.delta
                if result.kv is None:
                    finished = True
                    yield self._last(first, timings, request)
                    return
                yield first
                stream = self._stream(
                    self.decode_pool.pick(),
                    involved,
                    "decode",
                    request.request_id,
                    request.spec,
                    request.params,
                    result.kv,
                )
            async for delta in stream:
                timings.update(delta.extra)
                finished = delta.finished
                yield self._last(delta, timings, request) if finished else delta
        except StageError as exc:
            finished = True
            yield TokenDelta(request.request_id, [], "", FinishReason.ERROR, error=str(exc))
        finally:
            if not finished:
                for worker in involved:
                    await worker.call("cancel", request.request_id)

    async def _retry(self, pool: Pool, involved: list[WorkerHandle], method: str, *args: Any) -> Any:
        """E and P legs: one retry on another worker of the pool."""
        worker = pool.pick()
        for attempt in range(2):
            involved.append(worker)
            worker.outstanding += 1
            try:
                return await worker.call(method, *args)
            except Exception as exc:  # noqa: BLE001 - a worker or transfer failure; retried once
                await _quiet_cancel(worker, args[0])
                if attempt == 1:
                    raise StageError(method) from exc
                worker = pool.pick(exclude=worker)
            finally:
                worker.outstanding -= 1
        raise AssertionError("unreachable")

    async def _stream(
        self, worker: WorkerHandle, involved: list[WorkerHandle], method: str, *args: Any
    ) -> AsyncIterator[TokenDelta]:
        involved.append(worker)
        worker.outstanding += 1
        try:
            async for delta in worker.stream(method, *args):
                yield delta
        except Exception as exc:  # noqa: BLE001 - a failed decode ends the request with an error
            raise StageError(method) from exc
        finally:
            worker.outstanding -= 1

    @staticmethod
    def _last(delta: TokenDelta, timings: dict[str, float], request: Request) -> TokenDelta:
        timings["e2e_s"] = time.perf_counter() - request.arrival
        delta.extra = dict(timings)
        return delta


class StageError(RuntimeError):
    """A stage failed for a request after its retries."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"the {stage} stage failed")
        self.stage = stage


async def _quiet_cancel(worker: WorkerHandle, request_id: str) -> None:
    with contextlib.suppress(Exception):  # best effort on a worker that just failed
        await worker.call("cancel", request_id)
