"""Per-stage batching: which waiting requests prefill together, which running requests decode together.

Admission reserves, up front, the KV blocks a request can reach (prompt + max_tokens), so a running
request never has to be preempted for memory; blocks are still allocated as tokens arrive, so pool
usage reports what is really held.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from serving.config import EngineConfig
from serving.engine.kv_cache import KVPool
from serving.engine.sequence import Sequence
from serving.types import RequestStatus


@dataclass
class Batch:
    stage: str  # "prefill" or "decode"
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, cfg: EngineConfig, pool: KVPool) -> None:
        self.cfg = cfg
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV is already in the pool (imported from a prefill worker) joins decode."""
        seq.status = RequestStatus.RUNNING_DECODE
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _growth_reserved(self) -> int:
        """Blocks promised to running requests that they have not allocated yet."""
        return sum(self.pool.blocks_for(s.max_len) - len(s.block_table) for s in self.running)

    def can_admit(self, seq: Sequence, extra_blocks: int = 0) -> bool:
        need = self.pool.blocks_for(seq.max_len) - len(seq.block_table)
        return need + extra_blocks <= self.pool.num_free - self._growth_reserved()

    def schedule_prefill(self) -> list[Sequence]:
        """Waiting requests in arrival order under the token budget, the batch-size cap and KV room."""
        batch: list[Sequence] = []
        tokens = 0
        reserved = 0
        while self.waiting and len(self.running) + len(batch) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = seq.num_tokens - seq.num_cached
            if batch and tokens + new_tokens > self.cfg.max_prefill_tokens:
                break
            if not self.can_admit(seq, reserved):
                break
            self.waiting.popleft()
            seq.status = RequestStatus.RUNNING_PREFILL
            batch.append(seq)
            tokens += new_tokens
            reserved += self.pool.blocks_for(seq.max_len) - len(seq.block_table)
        return batch

    def schedule_decode(self) -> list[Sequence]:
        return self.running[: self.cfg.max_num_seqs]

    def schedule(self) -> Batch | None:
        """Prefill first (new requests reach their first token sooner), else a decode step."""
        if seqs := self.schedule_prefill():
            return Batch("prefill", seqs)
        if seqs := self.schedule_decode():
            return Batch("decode", seqs)
        return None

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence from every queue and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.free(seq.block_table)
