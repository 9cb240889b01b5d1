"""Paged attention over a packed batch of sequences with different query and context lengths.

One entry point serves prefill chunks (many new tokens, causal) and decode (one new token per
sequence), mixed in one step. New keys and values are written into the pool first; then the batch is
served in two groups:

- **Decode tokens** (one query, the whole context visible) go to a C kernel (`serving.engine.kernels`)
  that reads each sequence's blocks where they lie in the pool: no copy of the context, the heads that
  share a KV head read each key once, and nothing is padded.
- **Prompt tokens** (a whole prompt or a chunk of one) go to a second C kernel: causal flash attention
  over the same blocks in place, the mask aligned to each sequence's end (a chunk after cached tokens
  sees them and itself causally), key tiles past a query tile skipped rather than masked.

When a kernel is unavailable (no C compiler, a non-CPU device, a dtype it does not take) its tokens
read the blocks they use with one `index_select` per layer into packed contiguous keys and values, and
each sequence attends over its own rows with `scaled_dot_product_attention`: plainly causal for a
prompt prefilled at once, with a causal mask offset by what is cached for a chunk. The kernels are a
speed-up, never a requirement.

Why not attend in place with plain tensor ops: the pool is block-major (`(blocks, layers, 2,
block_size, ...)`, kept so one request's KV is one transportable region), so a layer's keys are strided
across blocks and no matmul reads them where they lie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from serving.engine import kernels
from serving.engine.kernels import fused


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
        for i in members:
            q_len, ctx = q_lens[i], ctx_lens[i]
            starts.append(len(blocks))
            blocks.extend(tables[i][: -(-ctx // block_size)])
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
        )


@dataclass
class AttentionBatch:
    slot_blocks: torch.Tensor  # (T,) block of each new token
    slot_offsets: torch.Tensor  # (T,) offset inside that block
    decode: _Group | None  # sequences feeding one token after their whole prompt is cached
    prompt: _Group | None  # the rest: whole prompts and prompt chunks
    # Sequences whose window queries score their prompt for visual-KV compaction (compaction.py).
    observers: list = field(default_factory=list)

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
        )


def _chunk_mask(q_len: int, ctx: int, device: torch.device) -> torch.Tensor:
    """(q_len, ctx) bool, True = attend: query i sits at position ctx - q_len + i."""
    q_pos = torch.arange(ctx - q_len, ctx, device=device)[:, None]
    return torch.arange(ctx, device=device)[None, :] <= q_pos


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    batch: AttentionBatch,
) -> torch.Tensor:
    """q (T, H, D), k/v (T, KV, D) packed; kv_cache one layer of the pool, (num_blocks, 2, block_size,
    KV, D). Returns (T, H * D)."""
    _write_kv(k, v, kv_cache, batch)
    heads, dim = q.shape[1], q.shape[2]
    out = q.new_empty(q.shape[0], heads * dim)
    if batch.decode is not None and not _decode_kernel(q, kv_cache, batch.decode, out):
        _attend_gathered(q, kv_cache, batch.decode, out)
    if batch.prompt is not None and not _prefill_kernel(q, kv_cache, batch.prompt, out):
        _attend_gathered(q, kv_cache, batch.prompt, out)
    return out


def _write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch) -> None:
    if fused.write_kv(k, v, kv_cache, batch.slot_blocks, batch.slot_offsets):
        return
    kv_cache[batch.slot_blocks, 0, batch.slot_offsets] = k
    kv_cache[batch.slot_blocks, 1, batch.slot_offsets] = v


def _decode_kernel(q: torch.Tensor, kv_cache: torch.Tensor, group: _Group, out: torch.Tensor) -> bool:
    """The decode group through the C kernel; False when it cannot run here."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        return False
    queries = q if group.rows is None else q.index_select(0, group.rows)
    # A batch of decode tokens only, in float32: the kernel writes the output rows where they go.
    direct = group.rows is None and out.dtype == torch.float32
    result = kernels.paged_decode(
        queries.to(torch.float32).contiguous(),
        kv_cache,
        group.block_index,
        group.block_starts,
        group.ctx,
        1.0 / math.sqrt(q.shape[2]),
        out=out.view(q.shape) if direct else None,
    )
    if result is None:
        return False
    if not direct:
        _store_rows(out, group.rows, result.view(result.shape[0], -1))
    return True


def _store_rows(out: torch.Tensor, rows: torch.Tensor | None, flat: torch.Tensor) -> None:
    """A kernel's float32 output for a group's rows (all of them when rows is None) into `out`."""
    if rows is None:
        out.copy_(flat)
    else:
        out.index_copy_(0, rows, flat.to(out.dtype))


def _prefill_kernel(q: torch.Tensor, kv_cache: torch.Tensor, group: _Group, out: torch.Tensor) -> bool:
    """The prompt group through the C kernel; False when it cannot run here."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        return False
    # The kernel reads and writes only the group's rows, so the whole batch goes in as it is; in
    # float32 the output rows land where they go.
    direct = q.dtype == torch.float32
    target = out.view(q.shape) if direct else torch.empty(q.shape, dtype=torch.float32)
    if not kernels.paged_prefill(
        q.to(torch.float32).contiguous(),
        kv_cache,
        group.block_index,
        group.block_starts,
        group.ctx,
        group.first_rows,
        group.row_counts,
        1.0 / math.sqrt(q.shape[2]),
        target,
    ):
        return False
    if not direct:
        flat = target.view(q.shape[0], -1)
        _store_rows(out, group.rows, flat if group.rows is None else flat.index_select(0, group.rows))
    return True


def _attend_gathered(q: torch.Tensor, kv_cache: torch.Tensor, group: _Group, out: torch.Tensor) -> None:
    """Read the group's used blocks into packed contiguous keys and values, then attend per sequence."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = kv_cache.shape[3]
    # Keys and values read separately so each comes out contiguous and flattens to rows as a view.
    keys = kv_cache[:, 0].index_select(0, group.block_index).flatten(0, 1)  # (P * block_size, KV, D)
    values = kv_cache[:, 1].index_select(0, group.block_index).flatten(0, 1)
    block_size = kv_cache.shape[2]
    for q_len, ctx, t, first_block in zip(
        group.q_lens, group.ctx_lens, group.q_starts, group.starts, strict=True
    ):
        row = first_block * block_size
        ks = keys[row : row + ctx].transpose(0, 1)[None]  # (1, KV, ctx, D), a view
        vs = values[row : row + ctx].transpose(0, 1)[None]
        if q_len == 1:
            # One query: the heads that share a KV head become that head's query rows, so the call
            # needs no GQA expansion and no mask (a decode token sees its whole context).
            o = F.scaled_dot_product_attention(q[t].view(1, kv_heads, heads // kv_heads, dim), ks, vs)
            out[t] = o.view(heads * dim)
        else:
            mask = _chunk_mask(q_len, ctx, q.device) if q_len < ctx else None
            o = F.scaled_dot_product_attention(
                q[t : t + q_len].transpose(0, 1)[None],
                ks,
                vs,
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=kv_heads != heads,
            )
            out[t : t + q_len] = o[0].transpose(0, 1).reshape(q_len, heads * dim)
