"""The P, D and colocated request paths of a stage worker: prefill (holding the KV for a decode
worker), decode (pulling it into reserved blocks), generate (both here), admission into the engine,
and per-request streams of deltas. Mixed into `StageWorker`."""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from serving.engine.inputs import Prompt
from serving.stages.kv_staging import StagedCopy
from serving.stages.outbox import DeltaTimings
from serving.types import (
    EmbeddingRef,
    FinishReason,
    KVRef,
    PrefillResult,
    PromptSpec,
    RequestFailed,
    Role,
    SamplingParams,
    StageTimings,
    TokenDelta,
    WorkerUnavailable,
    failure_of,
)

T = TypeVar("T")
_EVICTED = object()  # put in a stream's sink: the request must continue on another worker


class RequestPaths:
    # -- P ----------------------------------------------------------------------------------------

    def prefill(
        self: Any,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        embeddings: EmbeddingRef | None = None,
        images: list[np.ndarray] | None = None,
        resume: list[int] | None = None,
    ) -> PrefillResult:
        """Prefill and sample the first token (or, with `resume`, recompute the KV of tokens already
        streamed); hold the KV for a decode worker unless the request ended here."""
        self.ledger.admit(request_id, Role.PREFILL)
        try:
            return self._prefill(request_id, spec, params, embeddings, images, resume)
        except BaseException:
            self._quiet_free(request_id)
            raise

    def _prefill(
        self: Any,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        embeddings: EmbeddingRef | None,
        images: list[np.ndarray] | None,
        resume: list[int] | None,
    ) -> PrefillResult:
        timings = StageTimings()
        sink: queue.Queue[TokenDelta] = queue.Queue()
        self._admit(request_id, spec, embeddings, images, timings, params, True, resume, sink)
        delta = self._next(sink)
        timings.merge(self._prefilled.pop(request_id, None))
        if delta.finish_reason == FinishReason.ERROR:
            raise failure_of(delta, "the prefill failed", Role.PREFILL)
        if delta.finished:
            self._quiet_free(request_id)
            return PrefillResult(delta, None, timings)

        def hold() -> tuple[KVRef, list[int], StagedCopy | None]:
            self.ledger.update(request_id, _drop_sink)
            table, tokens, first, delta_pos = self.engine.held_kv(request_id)
            pool, staging = self.engine.runner.pool, self.kv_staging
            # Visual-KV compaction: only the kept positions' KV, in blocks of their own; the rope
            # delta grows by what was dropped, so decoded tokens keep their positions.
            compacted = self.engine.compact_held(request_id)
            kept = None
            if compacted is not None:
                kept, table = compacted
                # Decoded tokens keep their positions: the rope delta grows by the rows dropped.
                delta_pos += len(spec.token_ids) - len(kept)
                tokens = len(kept)
            # int8 transfer: a quantized copy in staging blocks; none free → the pool's own (lossless).
            blocks = staging.allocate(len(table)) if staging is not None else None
            copy = StagedCopy(staging, blocks) if blocks is not None else None

            def release() -> None:
                self.engine.release(request_id)
                if compacted is not None:
                    self.engine.free_blocks(compacted[1])
                if copy is not None:
                    copy.release()

            lease = self._hold(request_id, Role.PREFILL, release)
            self.ledger.update(request_id, _leave_engine)
            if blocks is not None:
                source = self.transport.publish("kvq", staging.regions(blocks))
            else:
                source = self.transport.publish("kv", pool.regions(table))
            ref = KVRef(
                source, tokens, first, delta_pos, lease, quantized=blocks is not None,
                kept=tuple(kept) if kept is not None else None,
            )  # fmt: skip
            return ref, list(table), copy

        ref, table, copy = self.loop.call(hold)
        if copy is not None:
            # Off the engine thread: the held blocks are read-only until the lease ends, and the
            # reference leaves this worker only once the copy is whole.
            try:
                self.kv_staging.pack(self.engine.runner.pool, table, copy.blocks)
            finally:
                copy.written()
        return PrefillResult(delta, ref, timings)

    def _admit(
        self: Any,
        request_id: str,
        spec: PromptSpec,
        embeddings: EmbeddingRef | None,
        images: list[np.ndarray] | None,
        timings: StageTimings,
        params: SamplingParams,
        prefill_only: bool,
        resume: list[int] | None,
        sink: Any,
    ) -> None:
        """Queue the request in the engine with its visual embeddings (pulled from an encode worker,
        encoded here, or none); its deltas go to `sink` (a queue, or a consumer's `StreamSink`)."""

        def add(prompt: Prompt, embeds: torch.Tensor | None) -> None:
            self.ledger.update(request_id, lambda e: setattr(e, "sink", sink))
            try:
                self.engine.add_request(
                    prompt, params, request_id, prefill_only=prefill_only, image_embeds=embeds, resume=resume
                )
            except ValueError as exc:
                raise RequestFailed(str(exc), Role.PREFILL) from None
            self.ledger.update(request_id, lambda e: setattr(e, "in_engine", True))

        self._prompt_inputs(request_id, spec, embeddings, images, timings, add)

    def _prompt_inputs(
        self: Any,
        request_id: str,
        spec: PromptSpec,
        embeddings: EmbeddingRef | None,
        images: list[np.ndarray] | None,
        timings: StageTimings,
        then: Callable[[Prompt, torch.Tensor | None], T],
    ) -> T:
        """The prompt and its visual embeddings (pulled from an encode worker, encoded here, or none)
        handed to `then` on the engine thread, in the same pass as the last work they need there (the
        vision batch, or the read of the pulled embeddings): the step right after can prefill them."""
        prompt = Prompt(spec.token_ids, grids=spec.grids, video_seconds=spec.video_seconds, keep=spec.keep)
        if embeddings is not None:
            timings.merge(embeddings.timings)
            prompt.kept = embeddings.kept
            return self._pull_embeddings(request_id, embeddings, timings, lambda embeds: then(prompt, embeds))
        if images:

            def encoded(embeds: torch.Tensor, kept: list[list[int] | None] | None) -> T:
                prompt.kept = kept
                return then(prompt, embeds)

            return self._embed_images(request_id, images, spec.keep, timings, encoded)
        return self.loop.call(lambda: then(prompt, None))

    def _wait_for(self: Any, attempt: Any) -> Any:
        """Run `attempt` on the engine thread until it gives something, within the admission timeout."""
        deadline = time.monotonic() + self.cfg.admission_timeout_s
        while (got := self.loop.call(attempt)) is None:
            if time.monotonic() > deadline:
                raise WorkerUnavailable("no room for the request in time")
            time.sleep(0.005)
        return got

    # -- D ----------------------------------------------------------------------------------------

    def decode(
        self: Any,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        kv: KVRef,
        restored: list[int] | None = None,
    ) -> Iterator[TokenDelta]:
        """Pull the KV into reserved blocks, join the decode batch, stream deltas until finished.
        `restored`: every token already streamed (a migrated request), the last one `kv.first_token`."""
        self.ledger.admit(request_id, Role.DECODE)
        try:
            sink, transfer_s = self._join_decode(request_id, spec, params, kv, restored)
        except BaseException:
            self._quiet_free(request_id)
            raise
        timings = StageTimings(p2d_transfer_s=transfer_s, p2d_bytes=float(kv.source.nbytes))
        yield from self._stream(request_id, sink, timings)

    def _join_decode(
        self: Any,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        kv: KVRef,
        restored: list[int] | None,
        make_sink: Any = None,
    ) -> tuple[Any, float]:
        """Reserve blocks, pull the KV into them, join the decode batch. The sink is a new queue, or
        what `make_sink(transfer seconds)` gives. A compacted handoff (`kv.kept`) decodes on the kept
        prompt tokens alone: their KV is all it has."""
        if kv.kept is not None:
            ids = spec.token_ids
            prompt = Prompt([ids[p] for p in kv.kept if p < len(ids)])
        else:
            prompt = Prompt(
                spec.token_ids, grids=spec.grids, video_seconds=spec.video_seconds, keep=spec.keep
            )

        def reserve() -> list[int] | None:
            try:
                table = self.engine.reserve(request_id, prompt, params, kv.num_tokens)
            except ValueError as exc:
                raise RequestFailed(str(exc), Role.DECODE) from None
            if table is not None:
                self.ledger.update(request_id, lambda e: setattr(e, "in_engine", True))
            return table

        table = self._wait_for(reserve)
        start = time.perf_counter()
        if kv.quantized:
            self._pull_quantized(request_id, kv, table)
        else:
            self._transfer(kv.source, "kv", self.engine.runner.pool.regions(table), kv.lease_id)
        transfer_s = time.perf_counter() - start
        sink = queue.Queue() if make_sink is None else make_sink(transfer_s)

        def join() -> None:
            self.ledger.update(request_id, lambda e: setattr(e, "sink", sink))
            self.engine.join_reserved(request_id, kv.first_token, kv.rope_delta, kv.num_tokens, restored)

        self.loop.call(join)
        return sink, transfer_s

    def _pull_quantized(self: Any, request_id: str, kv: KVRef, table: list[int]) -> None:
        """An int8 KV handoff: pulled into staging blocks of this worker's, dequantized into the
        reserved `table` on the engine thread, and only while the request still holds it (a cancel
        frees the table there too), so nothing is written into blocks another request was given."""
        staging = self.kv_staging
        if staging is None:
            raise RequestFailed("this worker takes no int8 KV (kv_transfer_dtype differs)", Role.DECODE)
        pool = self.engine.runner.pool
        count = kv.source.nbytes // staging.block_nbytes
        blocks = self._wait_for(lambda: staging.allocate(count))
        try:
            self._transfer(kv.source, "kvq", staging.regions(blocks), kv.lease_id)

            def restore() -> None:
                if not self.engine.holds(request_id):
                    raise WorkerUnavailable("the request was cancelled while its KV arrived")
                staging.unpack(pool, table[:count], blocks)

            self.loop.call(restore)
        finally:
            staging.free(blocks)

    # -- colocated P + D (and E) --------------------------------------------------------------------

    def generate(
        self: Any,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        embeddings: EmbeddingRef | None = None,
        images: list[np.ndarray] | None = None,
        resume: list[int] | None = None,
    ) -> Iterator[TokenDelta]:
        self.ledger.admit(request_id, Role.PREFILL)
        try:
            self.ledger.admit(request_id, Role.DECODE)
            timings = StageTimings()
            sink: queue.Queue[TokenDelta] = queue.Queue()
            self._admit(request_id, spec, embeddings, images, timings, params, False, resume, sink)
        except BaseException:
            self._quiet_free(request_id)
            raise
        yield from self._stream(request_id, sink, timings)

    def _stream(
        self: Any, request_id: str, sink: queue.Queue[TokenDelta], timings: StageTimings
    ) -> Iterator[TokenDelta]:
        """Deltas of a request until it finishes; timings ride on the first and the last delta."""
        stamp = DeltaTimings(request_id, timings, self._prefilled)
        try:
            while True:
                delta = stamp.stamp(self._next(sink))
                yield delta
                if delta.finished:
                    return
        finally:
            # Finished, evicted, or the consumer went away: free the request here.
            self._quiet_free(request_id)

    def _next(self: Any, sink: queue.Queue[TokenDelta]) -> TokenDelta:
        """The next delta of a request; raises WorkerUnavailable if the worker gave the request up."""
        while True:
            try:
                item = sink.get(timeout=1.0)
            except queue.Empty:
                if not self.loop.alive:
                    raise WorkerUnavailable("the worker's engine stopped") from None
                continue
            if item is _EVICTED:
                raise WorkerUnavailable("the worker gave the request up; it continues elsewhere")
            return item

    def _quiet_free(self: Any, request_id: str) -> None:
        if self.loop.alive:
            with contextlib.suppress(WorkerUnavailable):
                self.loop.call(lambda: self._free(request_id))
        else:
            self.ledger.pop(request_id)


def _leave_engine(entry: Any) -> None:
    entry.in_engine = False


def _drop_sink(entry: Any) -> None:
    entry.sink = None
