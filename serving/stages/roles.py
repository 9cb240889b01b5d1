"""Role changes and drains of a stage worker: refuse roles, evict what still uses them, and resize and
re-register the buffers (under a new transport epoch) when the new roles need other sizes. Mixed into
`StageWorker`."""

from __future__ import annotations

from typing import Any

from serving.stages.embeddings import EmbeddingBuffer
from serving.stages.kv_staging import KVStaging
from serving.stages.paths import _EVICTED
from serving.stages.placement import buffer_sizes
from serving.types import Role, Roles, WorkerInfo, WorkerPhase, WorkerUnavailable


class RoleControl:
    def stop_accepting(self: Any, roles: Roles) -> int:
        """Refuse new work for `roles` (the first step of a drain); returns requests still using them."""
        self.ledger.stop_accepting(roles)
        if not self.ledger.accepting:
            self.phase = WorkerPhase.DRAINING
        return self.ledger.using(roles)

    def using(self: Any, roles: Roles) -> int:
        """Requests the ledger holds anything for under `roles`: 0 means drained for them."""
        return self.ledger.using(roles)

    def evict(self: Any, roles: Roles) -> int:
        """Past a drain's deadline: streams still using `roles` here end with WorkerUnavailable, so the
        orchestrator migrates them; everything they held is freed. Returns how many were evicted."""

        def evict_all() -> int:
            ids = self.ledger.request_ids(roles)
            for rid in self._end_streams(ids):
                self._free(rid)  # held for a peer, not streaming: nothing to migrate, just free it
            return len(ids)

        return self.loop.call(evict_all)

    def _end_streams(self: Any, request_ids: list[str]) -> list[str]:
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

    def set_roles(self: Any, roles: Roles) -> WorkerInfo:
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

    def _resize(self: Any, roles: Roles) -> None:
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
        moves_kv = bool(roles & {Role.PREFILL, Role.DECODE})
        if self.cfg.kv_transfer_dtype == "int8" and moves_kv and (resize_kv or self.kv_staging is None):
            # A quarter of the pool's blocks (at least one longest request): P holds a request's
            # copy there until D pulls it; D only while it dequantizes.
            self.kv_staging = KVStaging(runner.pool, max(min_blocks, runner.pool.num_blocks // 4))
            self.transport.register("kvq", self.kv_staging.data)
        if resize_emb or "emb" not in self.transport.buffers:
            self.transport.register("emb", self.embeddings.data)

    def _new_embeddings(self: Any, slots: int) -> EmbeddingBuffer:
        runner = self.engine.runner
        hidden = self.engine.model_config.text.hidden_size
        return EmbeddingBuffer(slots, self.cfg.embedding_slot_tokens, hidden, runner.dtype, runner.device)
