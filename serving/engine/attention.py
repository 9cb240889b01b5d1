"""Paged attention over a packed batch of sequences with different query and context lengths.

One code path serves prefill chunks (many new tokens, causal) and decode (one new token per sequence),
mixed in one step: new keys and values are written into the pool first, then the blocks the batch
uses — and only those, no padding to the longest context — are read with one `index_select` per layer
into a packed `(tokens, kv_heads, head_dim)` buffer whose rows are each sequence's context in order.
Each sequence then attends over a view of its own rows, without a mask: a decode token sees its whole
context, a prompt prefilled at once is plainly causal, and only a chunk that continues a partly cached
prompt carries a small causal mask offset by what is cached.

Why a packed read rather than attending to the blocks where they lie: the pool is block-major
(`(blocks, layers, 2, block_size, ...)`, kept so one request's KV is one transportable region), so a
layer's keys are strided across blocks and no plain matmul reads them in place; a single
`index_select` of whole block rows runs at memory speed and costs what the context holds, where the
padded batch before it copied every sequence up to the longest one and masked the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionBatch:
    q_lens: list[int]
    ctx_lens: list[int]
    block_index: torch.Tensor  # (P,) every sequence's blocks, packed in batch order
    row_starts: list[int]  # each sequence's first row in the packed (P * block_size) context rows
    slot_blocks: torch.Tensor  # (T,) block of each new token
    slot_offsets: torch.Tensor  # (T,) offset inside that block
    masks: list[torch.Tensor | None]  # per sequence: causal mask of a chunk after cached tokens, else None

    @classmethod
    def build(
        cls,
        q_lens: list[int],
        ctx_lens: list[int],
        tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionBatch:
        blocks: list[int] = []
        row_starts: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        masks: list[torch.Tensor | None] = []
        for q_len, ctx, table in zip(q_lens, ctx_lens, tables, strict=True):
            used = -(-ctx // block_size)
            row_starts.append(len(blocks) * block_size)
            blocks.extend(table[:used])
            # Each sequence's new tokens are the last q_len of its context.
            for pos in range(ctx - q_len, ctx):
                slot_blocks.append(table[pos // block_size])
                slot_offsets.append(pos % block_size)
            masks.append(_chunk_mask(q_len, ctx, device) if 1 < q_len < ctx else None)
        return cls(
            q_lens=q_lens,
            ctx_lens=ctx_lens,
            block_index=torch.tensor(blocks, dtype=torch.long, device=device),
            row_starts=row_starts,
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=device),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=device),
            masks=masks,
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
    kv_cache[batch.slot_blocks, 0, batch.slot_offsets] = k
    kv_cache[batch.slot_blocks, 1, batch.slot_offsets] = v
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = kv_cache.shape[3]
    # One read of the used blocks' keys and values together (they are adjacent in each block).
    context = kv_cache.index_select(0, batch.block_index)  # (P, 2, block_size, KV, D)
    keys = context[:, 0].flatten(0, 1)  # (P * block_size, KV, D), a view
    values = context[:, 1].flatten(0, 1)
    out = q.new_empty(q.shape[0], heads * dim)
    t = 0
    for q_len, ctx, row, mask in zip(
        batch.q_lens, batch.ctx_lens, batch.row_starts, batch.masks, strict=True
    ):
        ks = keys[row : row + ctx].transpose(0, 1)[None]  # (1, KV, ctx, D), a view
        vs = values[row : row + ctx].transpose(0, 1)[None]
        if q_len == 1:
            # One query: the heads that share a KV head become that head's query rows, so the call
            # needs no GQA expansion and no mask (a decode token sees its whole context).
            o = F.scaled_dot_product_attention(q[t].view(1, kv_heads, heads // kv_heads, dim), ks, vs)
            out[t] = o.view(heads * dim)
        else:
            o = F.scaled_dot_product_attention(
                q[t : t + q_len].transpose(0, 1)[None],
                ks,
                vs,
                attn_mask=mask,
                is_causal=mask is None,
                enable_gqa=kv_heads != heads,
            )
            out[t : t + q_len] = o[0].transpose(0, 1).reshape(q_len, heads * dim)
        t += q_len
    return out
