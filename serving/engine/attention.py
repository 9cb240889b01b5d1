"""Paged attention over a packed batch of sequences with different query and context lengths.

One code path serves prefill (many new tokens, causal) and decode (one new token per sequence): new
keys and values are written into the pool first, then each sequence's context is gathered through its
block table and attended to under a causal, length-aware mask. The whole batch is one call per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionBatch:
    q_lens: list[int]
    ctx_lens: list[int]
    block_tables: torch.Tensor  # (B, max_blocks) long, padded with block 0 (masked out)
    slot_blocks: torch.Tensor  # (T,) block of each new token
    slot_offsets: torch.Tensor  # (T,) offset inside that block
    q_index: torch.Tensor | None  # (T,) position of each packed token in the (B * max_q) padded layout
    mask: torch.Tensor  # (B, 1, max_q, max_ctx) bool, True = attend
    max_q: int

    @classmethod
    def build(
        cls,
        q_lens: list[int],
        ctx_lens: list[int],
        tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionBatch:
        batch = len(q_lens)
        max_q, max_ctx = max(q_lens), max(ctx_lens)
        max_blocks = -(-max_ctx // block_size)
        table = torch.tensor([(b + [0] * max_blocks)[:max_blocks] for b in tables], dtype=torch.long)
        q_len_t = torch.tensor(q_lens)
        ctx_len_t = torch.tensor(ctx_lens)
        start = ctx_len_t - q_len_t  # each sequence's new tokens are the last q_len of its context
        # Per packed new token: its sequence, its index among that sequence's new tokens, its position.
        seq = torch.repeat_interleave(torch.arange(batch), q_len_t)
        nth = torch.arange(len(seq)) - torch.repeat_interleave(q_len_t.cumsum(0) - q_len_t, q_len_t)
        pos = start[seq] + nth
        q_pos = start[:, None] + torch.arange(max_q)[None, :]
        k_pos = torch.arange(max_blocks * block_size)[None, None, :]
        mask = (k_pos <= q_pos[:, :, None]) & (k_pos < ctx_len_t[:, None, None])
        return cls(
            q_lens=q_lens,
            ctx_lens=ctx_lens,
            block_tables=table.to(device),
            slot_blocks=table[seq, pos // block_size].to(device),
            slot_offsets=(pos % block_size).to(device),
            q_index=(seq * max_q + nth).to(device) if max_q > 1 else None,
            mask=mask[:, None].to(device),
            max_q=max_q,
        )


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
) -> torch.Tensor:
    """q (T, H, D), k/v (T, KV, D) packed; caches (num_blocks, block_size, KV, D). Returns (T, H * D)."""
    k_cache[batch.slot_blocks, batch.slot_offsets] = k
    v_cache[batch.slot_blocks, batch.slot_offsets] = v
    bsz = len(batch.q_lens)
    heads, dim = q.shape[1], q.shape[2]
    ctx_k = k_cache[batch.block_tables].flatten(1, 2).transpose(1, 2)  # (B, KV, L, D)
    ctx_v = v_cache[batch.block_tables].flatten(1, 2).transpose(1, 2)
    if batch.q_index is None:
        qp = q.view(bsz, 1, heads, dim)
    else:
        qp = q.new_zeros(bsz * batch.max_q, heads, dim).index_copy_(0, batch.q_index, q)
        qp = qp.view(bsz, batch.max_q, heads, dim)
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), ctx_k, ctx_v, attn_mask=batch.mask, enable_gqa=ctx_k.shape[1] != heads
    )
    out = out.transpose(1, 2).reshape(bsz * batch.max_q, heads * dim)
    return out if batch.q_index is None else out.index_select(0, batch.q_index)
