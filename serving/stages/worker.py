"""A stage worker: one engine, one transport endpoint, serving encode, prefill, decode or a mix.

Lifecycle of a request through split workers:
  1. encode (E): images are preprocessed, looked up in the embedding cache by content hash, and the
     misses join the next vision batch. The packed embeddings are copied into the registered
     embedding buffer and held under a lease; an EmbeddingRef goes back.
  2. prefill (P): the embeddings are pulled into this worker's buffer (the READ's notification tells
     E to release its lease), the prompt is prefilled in the next batch and its first token sampled.
     The KV blocks are held under a lease; a KVRef goes back with the first token.
  3. decode (D): blocks are reserved, the KV is pulled straight into them (P releases on the
     notification), and the request joins the continuous batch; token deltas stream back.
A colocated worker runs the adjacent stages itself (`generate`): no transfer between them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from serving.config import WorkerConfig
from serving.engine.inputs import Prompt
from serving.engine.llm import LLMEngine
from serving.stages.embeddings import EmbeddingBuffer, EmbeddingCache, image_key
from serving.stages.loop import EngineLoop
from serving.transport import TransferStatus, Transport, make_transport
from serving.transport.leases import LeaseTable
from serving.types import (
    EmbeddingRef,
    FinishReason,
    KVRef,
    PrefillResult,
    PromptSpec,
    SamplingParams,
    TokenDelta,
)

_POLL_S = 0.0005


class StageFailed(RuntimeError):
    """A stage could not do its part for a request (a failed transfer, no room in time)."""


def pin_process(cpus: tuple[int, ...]) -> None:
    """Pin every thread of this process (and so the threads it starts later) to `cpus`, and size
    torch's thread pool to match, so benchmarks can give each stage its own cores."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)
    torch.set_num_threads(len(cpus))


class StageWorker:
    def __init__(self, cfg: WorkerConfig, **transport_kwargs: Any) -> None:
        self.cfg = cfg
        if cfg.cpus:
            pin_process(cfg.cpus)
        self.name = cfg.name
        self.engine = LLMEngine(cfg.engine)
        runner = self.engine.runner
        self.embeddings = EmbeddingBuffer(
            cfg.embedding_slots, cfg.embedding_slot_tokens, self.engine.model_config.text.hidden_size,
            runner.dtype, runner.device,
        )  # fmt: skip
        self.transport: Transport = make_transport(cfg.transport, cfg.name, **transport_kwargs)
        self.transport.register("kv", runner.pool.data)
        self.transport.register("emb", self.embeddings.data)
        self.cache = EmbeddingCache(int(cfg.embedding_cache_mb * 2**20))
        self.leases = LeaseTable(cfg.name)
        self.loop = EngineLoop(self.engine, self._housekeeping)

    # -- control plane ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "roles": self.cfg.roles, "metadata": self.transport.metadata()}

    def add_peer(self, metadata: bytes) -> str:
        return self.loop.call(lambda: self.transport.add_peer(metadata))

    def stats(self) -> dict[str, float]:
        def read() -> dict[str, float]:
            pool = self.engine.runner.pool
            return {
                "kv_blocks_total": pool.num_blocks,
                "kv_blocks_used": pool.num_blocks - pool.num_free,
                "kv_cache_usage": pool.usage,
                "num_running": len(self.engine.scheduler.running),
                "num_waiting": len(self.engine.scheduler.waiting),
                "num_held": len(self.engine.held),
                "embedding_slots_free": self.embeddings.num_free,
                "mm_cache_hits": self.cache.hits,
                "mm_cache_misses": self.cache.misses,
                "mm_cache_entries": len(self.cache),
                "images_encoded": self.loop.images_encoded,
                "leases_active": len(self.leases),
                "leases_released": self.leases.released,
                "leases_expired": self.leases.expired,
            }

        return self.loop.call(read)

    def cancel(self, request_id: str) -> None:
        """Free everything this worker holds for a request, wherever it is."""

        def drop() -> None:
            self.leases.release_request(request_id)
            self.engine.abort(request_id)
            sink = self.loop.sinks.pop(request_id, None)
            if sink is not None:
                sink.put(TokenDelta(request_id, [], "", FinishReason.ABORT))

        self.loop.call(drop)

    def shutdown(self) -> None:
        self.loop.stop()
        self.transport.close()

    def _housekeeping(self) -> None:
        for tag in self.transport.notifications():
            self.leases.release(tag.decode())
        self.leases.expire()

    # -- E ----------------------------------------------------------------------------------------

    def encode(self, request_id: str, images: list[np.ndarray]) -> EmbeddingRef:
        start = time.perf_counter()
        packed, run_s = self._embed_images(images)
        rows = packed.shape[0]

        def hold() -> EmbeddingRef:
            slots = self.embeddings.allocate(rows)
            self.embeddings.write(slots, packed)
            lease = self.leases.grant(request_id, self.cfg.lease_ttl_s, lambda: self.embeddings.free(slots))
            source = self.transport.publish("emb", self.embeddings.regions(slots, rows))
            timings = {"encode_s": run_s, "encode_queue_s": time.perf_counter() - start - run_s}
            return EmbeddingRef(source, rows, lease, timings)

        return self.loop.call(hold)

    def _embed_images(self, images: list[np.ndarray]) -> tuple[torch.Tensor, float]:
        """Packed embeddings of the images, from the cache where possible; and the vision time."""
        keys = [image_key(im) for im in images]
        found = self.loop.call(lambda: [self.cache.get(k) for k in keys])
        missing = [i for i, hit in enumerate(found) if hit is None]
        run_s = 0.0
        if missing:
            processor = self.engine.inputs.image_processor
            processed = [processor(Image.fromarray(images[i])) for i in missing]
            t0 = time.perf_counter()
            fresh = self.loop.encode(processed)
            run_s = time.perf_counter() - t0

            def remember() -> None:
                for i, emb in zip(missing, fresh, strict=True):
                    self.cache.put(keys[i], emb)

            self.loop.call(remember)
            for i, emb in zip(missing, fresh, strict=True):
                found[i] = emb
        return torch.cat(found), run_s

    # -- P ----------------------------------------------------------------------------------------

    def prefill(
        self,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        embeddings: EmbeddingRef | None = None,
        images: list[np.ndarray] | None = None,
    ) -> PrefillResult:
        """Prefill and sample the first token; hold the KV for a decode worker unless it ended there."""
        timings: dict[str, float] = {}
        prompt, embeds = self._prompt_inputs(request_id, spec, embeddings, images, timings)
        start = time.perf_counter()
        sink = self.loop.call(lambda: self._admit(request_id, prompt, params, embeds, prefill_only=True))
        delta = sink.get()
        timings["prefill_s"] = self.loop.prefill_run_s.pop(request_id, 0.0)
        timings["prefill_queue_s"] = time.perf_counter() - start - timings["prefill_s"]
        if delta.finished:
            return PrefillResult(delta, None, timings)

        def hold() -> KVRef:
            table, tokens, first, delta_pos = self.engine.held_kv(request_id)
            lease = self.leases.grant(
                request_id, self.cfg.lease_ttl_s, lambda: self.engine.release(request_id)
            )
            source = self.transport.publish("kv", self.engine.runner.pool.regions(table))
            return KVRef(source, tokens, first, delta_pos, lease)

        return PrefillResult(delta, self.loop.call(hold), timings)

    def _admit(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        embeds: torch.Tensor | None,
        prefill_only: bool,
    ) -> queue.Queue[TokenDelta]:
        sink = self.loop.open_sink(request_id)
        try:
            self.engine.add_request(
                prompt, params, request_id, prefill_only=prefill_only, image_embeds=embeds
            )
        except BaseException:
            self.loop.sinks.pop(request_id, None)
            raise
        return sink

    def _prompt_inputs(
        self,
        request_id: str,
        spec: PromptSpec,
        embeddings: EmbeddingRef | None,
        images: list[np.ndarray] | None,
        timings: dict[str, float],
    ) -> tuple[Prompt, torch.Tensor | None]:
        """The prompt and its visual embeddings: pulled from an encode worker, encoded here, or none."""
        if embeddings is not None:
            timings.update(embeddings.timings)
            return Prompt(spec.token_ids, grids=spec.grids), self._pull_embeddings(embeddings, timings)
        if images:
            t0 = time.perf_counter()
            embeds, run_s = self._embed_images(images)
            timings["encode_s"], timings["encode_queue_s"] = run_s, time.perf_counter() - t0 - run_s
            return Prompt(spec.token_ids, grids=spec.grids), embeds
        return Prompt(spec.token_ids, grids=spec.grids), None

    def _pull_embeddings(self, ref: EmbeddingRef, timings: dict[str, float]) -> torch.Tensor:
        slots = self._wait_for(lambda: self.embeddings.allocate(ref.num_tokens) if self._room(ref) else None)
        try:
            start = time.perf_counter()
            regions = self.embeddings.regions(slots, ref.num_tokens)
            self._transfer(ref.source, "emb", regions, ref.lease_id)
            timings["e2p_transfer_s"] = time.perf_counter() - start
            timings["e2p_bytes"] = float(ref.source.nbytes)
            return self.loop.call(lambda: self.embeddings.read(slots, ref.num_tokens))
        finally:
            self.loop.call(lambda: self.embeddings.free(slots))

    def _room(self, ref: EmbeddingRef) -> bool:
        return self.embeddings.num_free >= self.embeddings.slots_for(ref.num_tokens)

    def _transfer(self, source: Any, buffer: str, regions: list[tuple[int, int]], lease_id: str) -> None:
        transfer = self.transport.read(source, buffer, regions, lease_id.encode())
        while not (status := transfer.poll()).final:
            time.sleep(_POLL_S)
        if status is not TransferStatus.DONE:
            raise StageFailed(f"transfer from {source.peer} {status.value}")

    def _wait_for(self, attempt: Any) -> Any:
        """Run `attempt` on the engine thread until it gives something, within the admission timeout."""
        deadline = time.monotonic() + self.cfg.admission_timeout_s
        while (got := self.loop.call(attempt)) is None:
            if time.monotonic() > deadline:
                raise StageFailed("no room for the request in time")
            time.sleep(0.005)
        return got

    # -- D ----------------------------------------------------------------------------------------

    def decode(
        self, request_id: str, spec: PromptSpec, params: SamplingParams, kv: KVRef
    ) -> Iterator[TokenDelta]:
        """Pull the KV into reserved blocks, join the decode batch, stream deltas until finished."""
        prompt = Prompt(spec.token_ids, grids=spec.grids)
        table = self._wait_for(lambda: self.engine.reserve(request_id, prompt, params, kv.num_tokens))
        start = time.perf_counter()
        try:
            self._transfer(kv.source, "kv", self.engine.runner.pool.regions(table), kv.lease_id)
        except StageFailed:
            self.loop.call(lambda: self.engine.abort(request_id))
            raise
        transfer_s = time.perf_counter() - start

        def join() -> queue.Queue[TokenDelta]:
            self.engine.join_reserved(request_id, kv.first_token, kv.rope_delta, kv.num_tokens)
            return self.loop.open_sink(request_id)

        sink = self.loop.call(join)
        extra = {"p2d_transfer_s": transfer_s, "p2d_bytes": float(kv.source.nbytes)}
        yield from self._stream(request_id, sink, extra)

    # -- colocated P + D (and E) --------------------------------------------------------------------

    def generate(
        self,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        embeddings: EmbeddingRef | None = None,
        images: list[np.ndarray] | None = None,
    ) -> Iterator[TokenDelta]:
        timings: dict[str, float] = {}
        prompt, embeds = self._prompt_inputs(request_id, spec, embeddings, images, timings)
        sink = self.loop.call(lambda: self._admit(request_id, prompt, params, embeds, prefill_only=False))
        yield from self._stream(request_id, sink, timings)

    def _stream(
        self, request_id: str, sink: queue.Queue[TokenDelta], extra: dict[str, float]
    ) -> Iterator[TokenDelta]:
        """Deltas of a request until it finishes; timings ride on the first and the last delta."""
        finished = False
        first_at: float | None = None
        try:
            while not finished:
                delta = sink.get()
                first_at = first_at or time.perf_counter()
                if run_s := self.loop.prefill_run_s.pop(request_id, None):
                    extra["prefill_s"] = run_s
                finished = delta.finished
                if finished:
                    extra["decode_s"] = time.perf_counter() - first_at
                if extra:
                    delta.extra.update(extra)
                    extra = {}
                yield delta
        finally:
            if not finished:  # the consumer went away: free the request here
                self.cancel(request_id)
