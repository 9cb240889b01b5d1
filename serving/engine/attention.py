"""One step's attention plan: which sequences feed how many new tokens, where their keys and values
lie in the paged pool, and where each new token's key and value go.

`AttentionBatch` is built once per step by the worker's attention backend (`serving.engine.backends`,
`plan`) and read by every layer's `forward`. The batch is split into two groups, served apart by every
backend that distinguishes them:

- **Decode tokens**: one query per sequence, the whole context visible;
- **Prompt tokens**: a whole prompt or a chunk of one, causal, a chunk after cached tokens seeing them.

Why the pool is block-major (`(blocks, layers, 2, block_size, ...)`): one request's KV is one
transportable region; so a layer's keys are strided across blocks and a backend reads them through
the group's block lists, never as one dense tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from serving.engine.backends import AttentionBackend


@dataclass
class _Group:
    """Some of the batch's sequences: their query rows and where their context lies."""

    q_lens: list[int]
    ctx_lens: list[int]
    q_starts: list[int]  # each sequence's first query row in the batch
    starts: list[int]  # each sequence's first entry in block_index (block_starts, for Python)
    rows: torch.Tensor | None  # (tokens,) the group's query rows in the batch; None = all rows, in order
    block_index: torch.Tensor  # (P,) the sequences' used blocks, packed
    block_starts: torch.Tensor  # (S,) int64, each sequence's first entry in block_index
    ctx: torch.Tensor  # (S,) int64 context lengths
    first_rows: torch.Tensor  # (S,) int64, q_starts on the CPU (for the prefill kernel)
    row_counts: torch.Tensor  # (S,) int64, q_lens on the CPU
    tables: list[list[int]]  # each sequence's used blocks (for the backends' own layouts)
    padded: Any = None  # the batched torch path's layout of this group, built on its first use

    @classmethod
    def build(
        cls,
        members: list[int],
        q_lens: list[int],
        ctx_lens: list[int],
        q_starts: list[int],
        tables: list[list[int]],
        block_size: int,
        total_rows: int,
        device: torch.device,
    ) -> _Group | None:
        if not members:
            return None
        blocks: list[int] = []
        starts: list[int] = []
        rows: list[int] = []
        used: list[list[int]] = []
        for i in members:
            q_len, ctx = q_lens[i], ctx_lens[i]
            starts.append(len(blocks))
            used.append(tables[i][: -(-ctx // block_size)])
            blocks.extend(used[-1])
            rows.extend(range(q_starts[i], q_starts[i] + q_len))
        everything = len(rows) == total_rows  # members are in batch order, so all rows means arange
        return cls(
            q_lens=[q_lens[i] for i in members],
            ctx_lens=[ctx_lens[i] for i in members],
            q_starts=[q_starts[i] for i in members],
            starts=starts,
            rows=None if everything else torch.tensor(rows, dtype=torch.long, device=device),
            block_index=torch.tensor(blocks, dtype=torch.long, device=device),
            block_starts=torch.tensor(starts, dtype=torch.long),
            ctx=torch.tensor([ctx_lens[i] for i in members], dtype=torch.long),
            first_rows=torch.tensor([q_starts[i] for i in members], dtype=torch.long),
            row_counts=torch.tensor([q_lens[i] for i in members], dtype=torch.long),
            tables=used,
        )


@dataclass
class AttentionBatch:
    slot_blocks: torch.Tensor  # (T,) block of each new token
    slot_offsets: torch.Tensor  # (T,) offset inside that block
    decode: _Group | None  # sequences feeding one token after their whole prompt is cached
    prompt: _Group | None  # the rest: whole prompts and prompt chunks
    block_size: int = 0
    # Sequences whose window queries score their prompt for visual-KV compaction (compaction.py).
    observers: list = field(default_factory=list)
    backend: AttentionBackend | None = None  # the backend that planned this step and runs its layers
    extra: Any = None  # that backend's own per-step layout, if it needs one

    @classmethod
    def build(
        cls,
        q_lens: list[int],
        ctx_lens: list[int],
        tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionBatch:
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        q_starts: list[int] = []
        decode: list[int] = []
        prompt: list[int] = []
        for i, (q_len, ctx, table) in enumerate(zip(q_lens, ctx_lens, tables, strict=True)):
            q_starts.append(len(slot_blocks))
            # Each sequence's new tokens are the last q_len of its context.
            for pos in range(ctx - q_len, ctx):
                slot_blocks.append(table[pos // block_size])
                slot_offsets.append(pos % block_size)
            (decode if q_len == 1 else prompt).append(i)
        total = len(slot_blocks)
        args = (q_lens, ctx_lens, q_starts, tables, block_size, total, device)
        return cls(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=device),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=device),
            decode=_Group.build(decode, *args),
            prompt=_Group.build(prompt, *args),
            block_size=block_size,
        )


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch
) -> torch.Tensor:
    """q (T, H, D), k/v (T, KV, D) packed; kv_cache one layer of the pool, (num_blocks, 2, block_size,
    KV, D). Returns (T, H * D), through the backend that planned the batch (the CPU one for a batch
    built directly)."""
    backend = batch.backend
    if backend is None:
        from serving.engine.backends.cpu import CpuBackend

        backend = batch.backend = CpuBackend()
    return backend.forward(q, k, v, kv_cache, batch)
