"""A stage worker: one engine, one transport endpoint, serving any set of the roles E, P and D.

Lifecycle of a request through split workers:
  1. encode (E): images are preprocessed, looked up in the embedding cache by content hash, and the
     misses join the next vision batch. The packed embeddings are copied into the registered
     embedding buffer and held under a lease; an EmbeddingRef goes back.
  2. prefill (P): the embeddings are pulled into this worker's buffer (the READ's notification tells
     E to release its lease), the prompt is prefilled in the next batch and its first token sampled.
     The KV blocks are held under a lease; a KVRef goes back with the first token.
  3. decode (D): blocks are reserved, the KV is pulled straight into them (P releases on the
     notification), and the request joins the continuous batch; token deltas stream back.
A colocated worker runs the adjacent stages itself (`generate`): no transfer between them. A migrated
request comes back with the tokens it already streamed (`resume` / `restored`): P recomputes their KV
and D replays them into its stop rules, so the stream goes on exactly where it broke.

Whatever the worker holds for a request is entered in its `Ledger`; `cancel` frees all of it at once.
Roles change at run time (`set_roles`): the control plane first stops routing, waits until the ledger
holds nothing for the removed roles, then the worker resizes its buffers and re-registers them with
the transport under a new epoch.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
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
from serving.stages.faults import FaultPlan
from serving.stages.ledger import Ledger
from serving.stages.loop import EngineLoop
from serving.stages.outbox import DeltaTimings, Outbox, StreamSink
from serving.stages.streams import ConsumerStreams
from serving.transport import TransferStatus, Transport, make_transport
from serving.transport.leases import LeaseTable
from serving.types import (
    EmbeddingRef,
    FinishReason,
    KVRef,
    PrefillResult,
    PromptSpec,
    RequestFailed,
    Role,
    Roles,
    SamplingParams,
    StageTimings,
    TokenDelta,
    TransferFailed,
    WorkerInfo,
    WorkerPhase,
    WorkerStats,
    WorkerUnavailable,
    parse_roles,
)

_POLL_S = 0.0005
_EVICTED = object()  # put in a stream's sink: the request must continue on another worker


def pin_process(cpus: tuple[int, ...]) -> None:
    """Pin every thread of this process (and so the threads it starts later) to `cpus`, and size
    torch's thread pool to match, so benchmarks can give each stage its own cores."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)
    torch.set_num_threads(len(cpus))


def buffer_sizes(roles: Roles, cfg: WorkerConfig, full_kv_blocks: int, min_kv_blocks: int) -> tuple[int, int]:
    """(KV blocks, embedding slots) a worker with these roles needs. D keeps whole requests: the full
    pool. P holds prompts only until D pulls them: a share of it, never less than one longest
    request. E needs no KV; only E and P move embeddings."""
    if Role.DECODE in roles:
        kv = full_kv_blocks
    elif Role.PREFILL in roles:
        kv = min(full_kv_blocks, max(min_kv_blocks, int(full_kv_blocks * cfg.prefill_kv_fraction)))
    else:
        kv = 1
    slots = cfg.embedding_slots if roles & {Role.ENCODE, Role.PREFILL} else 1
    return kv, slots


class StageWorker(ConsumerStreams):
    def __init__(self, cfg: WorkerConfig, **transport_kwargs: Any) -> None:
        self.cfg = cfg
        if cfg.cpus:
            pin_process(cfg.cpus)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.name = cfg.name
        self.roles: Roles = parse_roles(cfg.roles)
        self.phase = WorkerPhase.STARTING
        self.engine = LLMEngine(cfg.engine)
        self.transport: Transport = make_transport(cfg.transport, cfg.name, **transport_kwargs)
        self.ledger = Ledger(accepting=frozenset())
        self.leases = LeaseTable(cfg.name)
        self.embeddings = self._new_embeddings(1)
        self._resize(self.roles)
        self.cache = EmbeddingCache(int(cfg.embedding_cache_mb * 2**20))
        self.faults = FaultPlan()
        self.engine.fault_hook = self.faults.check
        self._prefill_s: dict[str, float] = {}
        self._outboxes: dict[str, Outbox] = {}  # consumer → its deltas not yet taken
        self.loop = EngineLoop(
            self.engine,
            self._housekeeping,
            self._deliver,
            self._on_broken,
            cfg.engine_stuck_after_s,
            housekeeping_due=lambda: len(self.leases) > 0,
        )
        self.ledger.accept(self.roles)
        self.phase = WorkerPhase.ACTIVE

    # -- control plane (never waits on the engine thread for long; see loop.call's liveness checks) --

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            self.name, self.roles, self.transport.metadata(), self.transport.epoch, os.getpid(), _node()
        )

    def add_peer(self, metadata: bytes, epoch: int = 0, name: str | None = None) -> str:
        return self.transport.add_peer(metadata, epoch, name)

    def remove_peer(self, name: str) -> None:
        self.transport.remove_peer(name)

    def stats(self) -> WorkerStats:
        """Read without the engine thread: a wedged engine still answers, with engine_alive False."""
        engine, pool = self.engine, self.engine.runner.pool
        return WorkerStats(
            name=self.name,
            roles=self.roles,
            phase=WorkerPhase.FAILED if not self.loop.alive else self.phase,
            pid=os.getpid(),
            node=_node(),
            kv_blocks_total=pool.num_blocks,
            kv_blocks_used=pool.num_blocks - pool.num_free,
            num_running=len(engine.scheduler.running),
            num_waiting=len(engine.scheduler.waiting),
            num_held=len(engine.held),
            requests_in_flight=len(self.ledger),
            embedding_slots_total=self.embeddings.data.shape[0],
            embedding_slots_free=self.embeddings.num_free,
            mm_cache_hits=self.cache.hits,
            mm_cache_misses=self.cache.misses,
            mm_cache_entries=len(self.cache),
            images_encoded=self.loop.images_encoded,
            leases_active=len(self.leases),
            leases_released=self.leases.released,
            leases_expired=self.leases.expired,
            requests_failed=engine.requests_failed,
            engine_alive=self.loop.alive,
            epoch=self.transport.epoch,
        )

    def cancel(self, request_id: str) -> None:
        """Free everything this worker holds for a request, wherever it is."""
        self.loop.call(lambda: self._free(request_id))

    def stop_accepting(self, roles: Roles) -> int:
        """Refuse new work for `roles` (the first step of a drain); returns requests still using them."""
        self.ledger.stop_accepting(roles)
        if not self.ledger.accepting:
            self.phase = WorkerPhase.DRAINING
        return self.ledger.using(roles)

    def using(self, roles: Roles) -> int:
        """Requests the ledger holds anything for under `roles`: 0 means drained for them."""
        return self.ledger.using(roles)

    def evict(self, roles: Roles) -> int:
        """Past a drain's deadline: streams still using `roles` here end with WorkerUnavailable, so the
        orchestrator migrates them; everything they held is freed. Returns how many were evicted."""

        def evict_all() -> int:
            ids = self.ledger.request_ids(roles)
            for rid in self._end_streams(ids):
                self._free(rid)  # held for a peer, not streaming: nothing to migrate, just free it
            return len(ids)

        return self.loop.call(evict_all)

    def _end_streams(self, request_ids: list[str]) -> list[str]:
        """End the streams of these requests with WorkerUnavailable (they continue elsewhere); returns
        the ones that had no stream here."""
        rest = []
        for rid in request_ids:
            entry = self.ledger.get(rid)
            if entry is not None and entry.sink is not None:
                entry.sink.put(_EVICTED)  # type: ignore[arg-type]
            else:
                rest.append(rid)
        return rest

    def set_roles(self, roles: Roles) -> WorkerInfo:
        """Serve `roles` from now on. Buffers are resized (and re-registered under a new epoch) when
        the new roles need other sizes, which needs the worker to hold nothing at all."""
        if not roles:
            raise ValueError("a worker needs at least one role")
        self.phase = WorkerPhase.RECONFIGURING
        try:
            self.loop.call(lambda: self._resize(roles))
        except BaseException:
            self.phase = WorkerPhase.DRAINING
            raise
        self.roles = roles
        self.ledger.accept(roles)
        self.phase = WorkerPhase.ACTIVE
        return self.info()

    def inject_fault(self, stage: str, request_id: str) -> None:
        """Tests only: raise inside `stage` ("encode", "prefill", "decode") whenever a batch includes
        `request_id`, as a bug or a bad input would."""
        self.faults.arm(stage, request_id)

    def shutdown(self) -> None:
        self.phase = WorkerPhase.STOPPED
        self.loop.stop()
        self.transport.close()

    def _resize(self, roles: Roles) -> None:
        runner = self.engine.runner
        min_blocks = runner.pool.blocks_for(self.cfg.engine.max_model_len)
        kv_blocks, slots = buffer_sizes(roles, self.cfg, runner.full_pool_blocks, min_blocks)
        resize_kv = kv_blocks != runner.pool.num_blocks
        resize_emb = slots != self.embeddings.data.shape[0]
        if (resize_kv or resize_emb) and (len(self.ledger) or self.engine.request_ids() or len(self.leases)):
            raise WorkerUnavailable("the worker still holds requests; drain it before resizing")
        if resize_kv:
            self.engine.resize_kv(kv_blocks)
        if resize_emb:
            self.embeddings = self._new_embeddings(slots)
        if resize_kv or "kv" not in self.transport.buffers:
            self.transport.register("kv", runner.pool.data)
        if resize_emb or "emb" not in self.transport.buffers:
            self.transport.register("emb", self.embeddings.data)

    def _new_embeddings(self, slots: int) -> EmbeddingBuffer:
        runner = self.engine.runner
        hidden = self.engine.model_config.text.hidden_size
        return EmbeddingBuffer(slots, self.cfg.embedding_slot_tokens, hidden, runner.dtype, runner.device)

    def _free(self, request_id: str) -> None:
        """On the engine thread: release every lease, engine slot, embedding slot and sink."""
        self.leases.release_request(request_id)
        self.engine.abort(request_id)
        self._prefill_s.pop(request_id, None)
        entry = self.ledger.pop(request_id)
        if entry is None:
            return
        for slots in entry.slot_lists:
            self.embeddings.free(slots)
        if entry.sink is not None:
            entry.sink.put(TokenDelta(request_id, [], "", FinishReason.ABORT))

    def _housekeeping(self) -> None:
        for tag in self.transport.notifications():
            self.leases.release(tag.decode())
        self.leases.expire()
        self.transport.expect_reads(len(self.leases) > 0)

    def _deliver(self, deltas: list[TokenDelta], stage: str, step_s: float) -> None:
        prefilled = set(self.engine.last_prefilled)
        touched: dict[int, Outbox] = {}
        for delta in deltas:
            if delta.request_id in prefilled:
                self._prefill_s[delta.request_id] = step_s
            entry = self.ledger.get(delta.request_id)
            sink = entry.sink if entry is not None else None
            if isinstance(sink, StreamSink):
                sink.queue(delta)
                touched[id(sink.outbox)] = sink.outbox
            elif sink is not None:
                sink.put(delta)
            if delta.finished:
                self.ledger.update(delta.request_id, _leave_engine)
                if isinstance(sink, StreamSink):  # its stream ends here: free what it held now
                    self.ledger.update(delta.request_id, _drop_sink)
                    self._free(delta.request_id)
        for outbox in touched.values():
            outbox.flush()  # one message per consumer for the whole step

    def _on_broken(self, reason: str) -> None:
        """The engine cannot go on: every stream here ends so its request continues elsewhere."""
        self.ledger.accept(frozenset())
        self._end_streams(self.ledger.request_ids())

    def _hold(self, request_id: str, role: Role, on_release: Any) -> str:
        """Grant a lease for what this request leaves here for a peer to pull; entered in the ledger."""

        def release() -> None:
            on_release()
            self.ledger.update(request_id, lambda e: (e.leases.discard(lease), e.roles.discard(role)))

        lease = self.leases.grant(request_id, self.cfg.lease_ttl_s, release)
        self.ledger.update(request_id, lambda e: e.leases.add(lease))
        self.transport.expect_reads(True)  # a peer will pull it: progress the transport meanwhile
        return lease

    # -- E ----------------------------------------------------------------------------------------

    def encode(self, request_id: str, images: list[np.ndarray]) -> EmbeddingRef:
        self.ledger.admit(request_id, Role.ENCODE)
        try:
            return self._encode(request_id, images)
        except BaseException:
            self._quiet_free(request_id)
            raise

    def _encode(self, request_id: str, images: list[np.ndarray]) -> EmbeddingRef:
        start = time.perf_counter()
        packed, run_s = self._embed_images(request_id, images)
        rows = packed.shape[0]

        def hold() -> EmbeddingRef:
            if not self._room(rows):
                raise WorkerUnavailable("no embedding slots free")
            slots = self.embeddings.allocate(rows)
            self.embeddings.write(slots, packed)
            lease = self._hold(request_id, Role.ENCODE, lambda: self.embeddings.free(slots))
            source = self.transport.publish("emb", self.embeddings.regions(slots, rows))
            timings = StageTimings(encode_s=run_s, encode_queue_s=time.perf_counter() - start - run_s)
            return EmbeddingRef(source, rows, lease, timings)

        return self.loop.call(hold)

    def _embed_images(self, request_id: str, images: list[np.ndarray]) -> tuple[torch.Tensor, float]:
        """Packed embeddings of the images, from the cache where possible; and the vision time."""
        keys = [image_key(im) for im in images]
        found = self.loop.call(lambda: [self.cache.get(k) for k in keys])
        missing = [i for i, hit in enumerate(found) if hit is None]
        run_s = 0.0
        if missing:
            processor = self.engine.inputs.image_processor
            processed = [processor(Image.fromarray(images[i])) for i in missing]
            t0 = time.perf_counter()
            try:
                fresh = self.loop.encode(request_id, processed)
            except WorkerUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - this request's images failed, alone
                raise RequestFailed("the images could not be encoded") from exc
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
        self,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        embeddings: EmbeddingRef | None,
        images: list[np.ndarray] | None,
        resume: list[int] | None,
    ) -> PrefillResult:
        timings = StageTimings()
        prompt, embeds = self._prompt_inputs(request_id, spec, embeddings, images, timings)
        start = time.perf_counter()
        sink = self._admit(request_id, prompt, params, embeds, prefill_only=True, resume=resume)
        delta = self._next(sink)
        timings.prefill_s = self._prefill_s.pop(request_id, 0.0)
        timings.prefill_queue_s = time.perf_counter() - start - timings.prefill_s
        if delta.finish_reason == FinishReason.ERROR:
            raise RequestFailed(delta.error or "the prefill failed")
        if delta.finished:
            self._quiet_free(request_id)
            return PrefillResult(delta, None, timings)

        def hold() -> KVRef:
            self.ledger.update(request_id, _drop_sink)
            table, tokens, first, delta_pos = self.engine.held_kv(request_id)
            lease = self._hold(request_id, Role.PREFILL, lambda: self.engine.release(request_id))
            self.ledger.update(request_id, _leave_engine)
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
        resume: list[int] | None = None,
        sink: Any = None,
    ) -> Any:
        """Queue the request in the engine; its deltas arrive in the returned sink (a new queue, unless
        a consumer's `StreamSink` is given)."""
        if sink is None:
            sink = queue.Queue()

        def add() -> None:
            self.ledger.update(request_id, lambda e: setattr(e, "sink", sink))
            try:
                self.engine.add_request(
                    prompt, params, request_id, prefill_only=prefill_only, image_embeds=embeds, resume=resume
                )
            except ValueError as exc:
                raise RequestFailed(str(exc)) from None
            self.ledger.update(request_id, lambda e: setattr(e, "in_engine", True))

        self.loop.call(add)
        return sink

    def _prompt_inputs(
        self,
        request_id: str,
        spec: PromptSpec,
        embeddings: EmbeddingRef | None,
        images: list[np.ndarray] | None,
        timings: StageTimings,
    ) -> tuple[Prompt, torch.Tensor | None]:
        """The prompt and its visual embeddings: pulled from an encode worker, encoded here, or none."""
        prompt = Prompt(spec.token_ids, grids=spec.grids)
        if embeddings is not None:
            timings.merge(embeddings.timings)
            return prompt, self._pull_embeddings(request_id, embeddings, timings)
        if images:
            t0 = time.perf_counter()
            embeds, run_s = self._embed_images(request_id, images)
            timings.encode_s, timings.encode_queue_s = run_s, time.perf_counter() - t0 - run_s
            return prompt, embeds
        return prompt, None

    def _pull_embeddings(self, request_id: str, ref: EmbeddingRef, timings: StageTimings) -> torch.Tensor:
        def take() -> list[int] | None:
            if not self._room(ref.num_tokens):
                return None
            slots = self.embeddings.allocate(ref.num_tokens)
            self.ledger.update(request_id, lambda e: e.slot_lists.append(slots))
            return slots

        slots = self._wait_for(take)
        start = time.perf_counter()
        regions = self.embeddings.regions(slots, ref.num_tokens)
        self._transfer(ref.source, "emb", regions, ref.lease_id)
        timings.e2p_transfer_s = time.perf_counter() - start
        timings.e2p_bytes = float(ref.source.nbytes)

        def read_and_free() -> torch.Tensor:
            out = self.embeddings.read(slots, ref.num_tokens)
            self.embeddings.free(slots)
            self.ledger.update(request_id, lambda e: e.slot_lists.remove(slots))
            return out

        return self.loop.call(read_and_free)

    def _room(self, rows: int) -> bool:
        return self.embeddings.num_free >= self.embeddings.slots_for(rows)

    def _transfer(self, source: Any, buffer: str, regions: list[tuple[int, int]], lease_id: str) -> None:
        transfer = self.transport.read(source, buffer, regions, lease_id.encode())
        while not (status := transfer.poll()).final:
            time.sleep(_POLL_S)
        if status is not TransferStatus.DONE:
            raise TransferFailed(f"transfer from {source.peer} {status.value}")

    def _wait_for(self, attempt: Any) -> Any:
        """Run `attempt` on the engine thread until it gives something, within the admission timeout."""
        deadline = time.monotonic() + self.cfg.admission_timeout_s
        while (got := self.loop.call(attempt)) is None:
            if time.monotonic() > deadline:
                raise WorkerUnavailable("no room for the request in time")
            time.sleep(0.005)
        return got

    # -- D ----------------------------------------------------------------------------------------

    def decode(
        self,
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
        self,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        kv: KVRef,
        restored: list[int] | None,
        make_sink: Any = None,
    ) -> tuple[Any, float]:
        """Reserve blocks, pull the KV into them, join the decode batch. The sink is a new queue, or
        what `make_sink(transfer seconds)` gives."""
        prompt = Prompt(spec.token_ids, grids=spec.grids)

        def reserve() -> list[int] | None:
            try:
                table = self.engine.reserve(request_id, prompt, params, kv.num_tokens)
            except ValueError as exc:
                raise RequestFailed(str(exc)) from None
            if table is not None:
                self.ledger.update(request_id, lambda e: setattr(e, "in_engine", True))
            return table

        table = self._wait_for(reserve)
        start = time.perf_counter()
        self._transfer(kv.source, "kv", self.engine.runner.pool.regions(table), kv.lease_id)
        transfer_s = time.perf_counter() - start
        sink = queue.Queue() if make_sink is None else make_sink(transfer_s)

        def join() -> None:
            self.ledger.update(request_id, lambda e: setattr(e, "sink", sink))
            self.engine.join_reserved(request_id, kv.first_token, kv.rope_delta, kv.num_tokens, restored)

        self.loop.call(join)
        return sink, transfer_s

    # -- colocated P + D (and E) --------------------------------------------------------------------

    def generate(
        self,
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
            prompt, embeds = self._prompt_inputs(request_id, spec, embeddings, images, timings)
            sink = self._admit(request_id, prompt, params, embeds, prefill_only=False, resume=resume)
        except BaseException:
            self._quiet_free(request_id)
            raise
        yield from self._stream(request_id, sink, timings)

    def _stream(
        self, request_id: str, sink: queue.Queue[TokenDelta], timings: StageTimings
    ) -> Iterator[TokenDelta]:
        """Deltas of a request until it finishes; timings ride on the first and the last delta."""
        stamp = DeltaTimings(request_id, timings, self._prefill_s)
        try:
            while True:
                delta = stamp.stamp(self._next(sink))
                yield delta
                if delta.finished:
                    return
        finally:
            # Finished, evicted, or the consumer went away: free the request here.
            self._quiet_free(request_id)

    def _next(self, sink: queue.Queue[TokenDelta]) -> TokenDelta:
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

    def _quiet_free(self, request_id: str) -> None:
        if self.loop.alive:
            with contextlib.suppress(WorkerUnavailable):
                self.loop.call(lambda: self._free(request_id))
        else:
            self.ledger.pop(request_id)


def _leave_engine(entry: Any) -> None:
    entry.in_engine = False


def _drop_sink(entry: Any) -> None:
    entry.sink = None


def _node() -> str:
    return socket.gethostname()
