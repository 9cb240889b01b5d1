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

The worker is one class assembled from parts, each a module of `serving.stages`:
  `worker` (this module): the actor class: construction, stats, cancel, shutdown, step delivery;
  `roles`: role changes and drains: refuse roles, evict streams, resize and re-register buffers;
  `transfers`: the transport endpoint: peers, leases on what peers pull, notifications, pulls;
  `encode`: the E path: images through the embedding cache and the vision batch into leased slots;
  `paths`: the P, D and colocated request paths: admission into the engine, per-request streams;
  `streams`: per-step batched streams to consumers (`subscribe`, `start_generate`, `start_decode`);
  `placement`: CPU pinning of a worker process and the buffer sizes its roles need.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from serving.config import WorkerConfig
from serving.engine import kernels
from serving.engine.llm import LLMEngine
from serving.stages.decode import Decoder
from serving.stages.embeddings import EmbeddingCache
from serving.stages.encode import EncodePath
from serving.stages.faults import FaultPlan
from serving.stages.kv_staging import KVStaging
from serving.stages.ledger import Ledger
from serving.stages.loop import EngineLoop
from serving.stages.outbox import Outbox, StreamSink
from serving.stages.paths import _EVICTED, RequestPaths, _drop_sink, _leave_engine
from serving.stages.placement import buffer_sizes, keep_cpus_for_engine, pin_process
from serving.stages.roles import RoleControl
from serving.stages.streams import ConsumerStreams, StreamCounters
from serving.stages.transfers import TransferEndpoint
from serving.transport import Transport, make_transport
from serving.transport.leases import LeaseTable
from serving.types import (
    FinishReason,
    Roles,
    StageTimings,
    TokenDelta,
    WorkerInfo,
    WorkerPhase,
    WorkerStats,
    parse_roles,
)

# Re-exported: these lived here before the worker was split into modules.
__all__ = ["_EVICTED", "StageWorker", "buffer_sizes", "pin_process"]


class StageWorker(RoleControl, TransferEndpoint, EncodePath, RequestPaths, ConsumerStreams):
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
        # On a CPU the kernels are built (or found in the cache) now, not on the first request, and
        # how they stand is reported: a missing compiler is a 2-5x slowdown nobody should have to guess.
        device = self.engine.runner.device.type
        self.backend = (self.engine.runner.attention.name, kernels.status() if device == "cpu" else "none")
        self.transport: Transport = make_transport(cfg.transport, cfg.name, **transport_kwargs)
        self.ledger = Ledger(accepting=frozenset())
        self.leases = LeaseTable(cfg.name)
        self.embeddings = self._new_embeddings(1)
        self.kv_staging: KVStaging | None = None  # with kv_transfer_dtype int8
        self._resize(self.roles)
        self.cache = EmbeddingCache(int(cfg.embedding_cache_mb * 2**20))
        self.decoder = Decoder()  # the gateway ships media compressed: decoded here, off the engine thread
        self.faults = FaultPlan()
        self.engine.fault_hook = self.faults.check
        self._prefilled: dict[str, StageTimings] = {}  # prefill timings until its stream takes them
        self._outboxes: dict[str, Outbox] = {}  # consumer → its deltas not yet taken
        self.stream_counters = StreamCounters()
        self.loop = EngineLoop(
            self.engine,
            self._housekeeping,
            self._deliver,
            self._on_broken,
            cfg.engine_stuck_after_s,
            housekeeping_due=lambda: len(self.leases) > 0,
            on_start=(
                (lambda: keep_cpus_for_engine(cfg.cpus, cfg.runtime_cpus))
                if cfg.cpus and cfg.runtime_cpus
                else None
            ),
            wanted=lambda request_id: self.ledger.get(request_id) is not None,
        )
        self.ledger.accept(self.roles)
        self.phase = WorkerPhase.ACTIVE

    # -- control plane (never waits on the engine thread for long; see loop.call's liveness checks) --

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            self.name, self.roles, self.transport.metadata(), self.transport.epoch, os.getpid(), _node()
        )

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
            kv_block_size=pool.block_size,
            backend=self.backend[0],
            kernels=self.backend[1],
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
            images_decoded=self.decoder.decoded["image"],
            videos_decoded=self.decoder.decoded["video"],
            visual_kv_kept=engine.visual_kv_kept,
            visual_kv_dropped=engine.visual_kv_dropped,
            leases_active=len(self.leases),
            leases_released=self.leases.released,
            leases_expired=self.leases.expired,
            requests_failed=engine.requests_failed,
            engine_alive=self.loop.alive,
            epoch=self.transport.epoch,
            prefix_cache_queried_tokens=engine.scheduler.prefix_queried_tokens,
            prefix_cache_hit_tokens=engine.scheduler.prefix_hit_tokens,
        )

    def cancel(self, request_id: str) -> None:
        """Free everything this worker holds for a request, wherever it is."""
        self.loop.call(lambda: self._free(request_id))

    def inject_fault(self, stage: str, request_id: str) -> None:
        """Tests only: raise inside `stage` ("encode", "prefill", "decode") whenever a batch includes
        `request_id`, as a bug or a bad input would."""
        self.faults.arm(stage, request_id)

    def shutdown(self) -> None:
        self.phase = WorkerPhase.STOPPED
        self.loop.stop()
        self.decoder.close()
        self.transport.close()

    def _free(self, request_id: str) -> None:
        """On the engine thread: release every lease, engine slot, embedding slot and sink."""
        self.leases.release_request(request_id)
        self.engine.abort(request_id)
        self._prefilled.pop(request_id, None)
        entry = self.ledger.pop(request_id)
        if entry is None:
            return
        for slots in entry.slot_lists:
            self.embeddings.free(slots)
        if entry.sink is not None:
            entry.sink.put(TokenDelta(request_id, [], "", FinishReason.ABORT))

    def _deliver(self, deltas: list[TokenDelta]) -> None:
        prefilled = self.engine.last_prefilled
        touched: dict[int, Outbox] = {}
        for delta in deltas:
            if (prefill := prefilled.get(delta.request_id)) is not None:
                self._prefilled[delta.request_id] = prefill
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


def _node() -> str:
    return socket.gethostname()
