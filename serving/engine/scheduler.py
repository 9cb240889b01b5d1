"""Per-step batching with chunked prefill: every step is one forward over a token budget that mixes
decode tokens and prefill chunks (vLLM's default scheduler).

Each step takes, in order: one token for every running request (decode never waits behind a long
prompt), then the next chunk of each partly prefilled request, then new requests in arrival order,
each prompt cut to what is left of `max_step_tokens` (and of `max_prefill_tokens`). A prompt longer
than the budget is prefilled over several steps while the decode batch keeps going.

Admission reserves, up front, the KV blocks a request can reach (prompt + max_tokens), so a running
request never has to be preempted for memory; blocks are still allocated as tokens arrive, so pool
usage reports what is really held.

With prefix caching on, admission first looks up the request's longest cached prefix of full prompt
blocks (never the whole prompt: the last prompt token is always recomputed, for its logits), takes
references to those blocks and starts the prefill after them; blocks someone else already holds cost
the admission nothing. After each step the engine offers newly completed prompt blocks to the cache
(`register_computed`), so a request admitted later shares them even while their first owner runs.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from serving.config import EngineConfig
from serving.engine import compaction
from serving.engine.kv_cache import KVPool
from serving.engine.sequence import Sequence
from serving.types import RequestStatus


@dataclass
class Batch:
    seqs: list[Sequence]
    q_lens: list[int]  # tokens each sequence computes this step: 1 to decode, a chunk to prefill
    num_decode: int  # the first num_decode sequences decode; the rest prefill

    @property
    def decoding(self) -> list[Sequence]:
        return self.seqs[: self.num_decode]

    @property
    def prefilling(self) -> list[Sequence]:
        return self.seqs[self.num_decode :]


class Scheduler:
    def __init__(self, cfg: EngineConfig, pool: KVPool) -> None:
        self.cfg = cfg
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []  # admitted, KV partly computed (chunked prefill)
        self.running: list[Sequence] = []  # decoding
        # Admitted by `LLMEngine.reserve`, their KV still arriving from a prefill worker: they hold the
        # blocks for it and will grow from there once they join, so admission counts their growth too.
        self.reserved: dict[str, Sequence] = {}
        self.prefix_queried_tokens = 0  # prompt tokens of admitted requests (vLLM's prefix_cache_queries)
        self.prefix_hit_tokens = 0  # of those, tokens whose KV came from the prefix cache

    def add(self, seq: Sequence) -> None:
        seq.queued_at = time.perf_counter()  # its prefill queue time runs from here
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV is in the pool (prefilled here or imported from a prefill worker)
        joins decode."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        seq.status = RequestStatus.RUNNING_DECODE
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def _growth_reserved(self) -> int:
        """Blocks promised to admitted requests that they have not allocated yet."""
        admitted = (*self.running, *self.prefilling, *self.reserved.values())
        return sum(self.pool.blocks_for(s.max_len) - len(s.block_table) for s in admitted)

    def can_admit(self, seq: Sequence, extra_blocks: int = 0, hit: list[int] | None = None) -> bool:
        """Whether the pool can hold all `seq` may reach; `hit` are cached prefix blocks it would share
        (those already held by another request take no free block)."""
        need = self.pool.blocks_for(seq.max_len) - len(seq.block_table)
        if hit:
            need -= self.pool.num_in_use(hit)
        return need + extra_blocks <= self.pool.num_free - self._growth_reserved()

    def prefix_hit(self, seq: Sequence) -> list[int]:
        """The cached blocks `seq` could start from: its longest cached prefix of full prompt blocks,
        short of the last prompt token (and of the last token to prefill), which is always computed."""
        if not self.cfg.enable_prefix_caching or seq.block_table or seq.num_cached:
            return []
        limit = (min(len(seq.prompt_token_ids), seq.num_prefill_tokens) - 1) // self.pool.block_size
        if seq.kv_scores is not None:  # compaction scores its window's queries: they are computed
            limit = min(limit, compaction.window(len(seq.prompt_token_ids))[0] // self.pool.block_size)
        return self.pool.lookup_prefix(seq.block_hashes[:limit])

    def _admit(self, seq: Sequence, hit: list[int]) -> None:
        if hit:
            self.pool.share(hit)
            seq.block_table.extend(hit)
            seq.num_cached = seq.num_prefix_hit = len(hit) * self.pool.block_size
            seq.num_registered = len(hit)
        if self.cfg.enable_prefix_caching:
            self.prefix_queried_tokens += len(seq.prompt_token_ids)
            self.prefix_hit_tokens += seq.num_prefix_hit

    def register_computed(self, seq: Sequence) -> None:
        """Offer the prompt blocks `seq` has fully computed since the last call to the prefix cache."""
        if not self.cfg.enable_prefix_caching:
            return
        full = min(seq.num_cached, len(seq.prompt_token_ids)) // self.pool.block_size
        full = min(full, len(seq.block_hashes), len(seq.block_table))
        for i in range(seq.num_registered, full):
            self.pool.register(seq.block_table[i], seq.block_hashes[i])
        seq.num_registered = max(seq.num_registered, full)

    def schedule(self) -> Batch | None:
        """Decode tokens first, then prefill chunks, under the step's token budget."""
        budget = self.cfg.max_step_tokens
        take = min(self.cfg.max_num_seqs, budget)
        seqs = self.running[:take]
        if len(self.running) > take:
            # More running than one step takes: the next step starts after these, so none starves.
            self.running = self.running[take:] + seqs
        q_lens = [1] * len(seqs)
        num_decode = len(seqs)
        prefill_budget = min(budget - len(seqs), self.cfg.max_prefill_tokens)
        for seq in self.prefilling:
            if prefill_budget <= 0:
                break
            chunk = min(seq.num_prefill_tokens - seq.num_cached, prefill_budget)
            seqs.append(seq)
            q_lens.append(chunk)
            prefill_budget -= chunk
        while (
            self.waiting
            and prefill_budget > 0
            and len(self.running) + len(self.prefilling) < self.cfg.max_num_seqs
            and self.can_admit(self.waiting[0], hit=(hit := self.prefix_hit(self.waiting[0])))
        ):
            seq = self.waiting.popleft()
            self._admit(seq, hit)
            seq.status = RequestStatus.RUNNING_PREFILL
            self.prefilling.append(seq)
            chunk = min(seq.num_prefill_tokens - seq.num_cached, prefill_budget)
            seqs.append(seq)
            q_lens.append(chunk)
            prefill_budget -= chunk
        if not seqs:
            return None
        return Batch(seqs, q_lens, num_decode)

    def hand_off(self, seq: Sequence) -> None:
        """A prefill-only request is prefilled: it leaves the batch, its blocks stay with it."""
        if seq in self.prefilling:
            self.prefilling.remove(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence from every queue and give its blocks back."""
        for queue in (self.running, self.prefilling, self.waiting):
            if seq in queue:
                queue.remove(seq)
        self.pool.free(seq.block_table)
