"""The torch backend: each group of a step (decode tokens, prompt tokens) as one batched
`scaled_dot_product_attention` call per layer, on any device, with no compiled code.

Per group the plan lays the sequences side by side, padded: a block table `(S, max blocks)` that one
`index_select` per layer turns into keys and values `(S, KV, max context, D)`, the query rows
`(S, max new tokens)`, and a mask that lets each query see its own context only, causally (a chunk after
cached tokens sees them and itself). Padding costs memory where lengths differ; in exchange a step is
two calls per layer, not one per sequence. The pool's unwritten slots are finite (it is zeroed when
made and only ever written with keys and values), so masked scores never turn into NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serving.engine.attention import AttentionBatch, _Group
from serving.engine.backends import AttentionBackend, write_kv


class TorchBackend(AttentionBackend):
    name = "torch"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, batch)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        for group in (batch.decode, batch.prompt):
            if group is not None:
                attend_padded(q, kv_cache, group, batch.block_size, out)
        return out


@dataclass
class Padded:
    """One group laid out for a batched call (see the module doc)."""

    table: torch.Tensor  # (S * max_blocks,) the sequences' blocks, each padded to max_blocks
    queries: torch.Tensor  # (S * max_q,) each sequence's query rows in the batch, padded
    real: torch.Tensor  # (N,) which of those S * max_q rows are real, in the group's row order
    out_rows: torch.Tensor  # (N,) the batch rows they go to
    mask: torch.Tensor | None  # (S, 1, max_q, max_ctx) True = attend; None: nothing to mask
    sequences: int
    max_q: int
    max_ctx: int
    max_blocks: int

    @classmethod
    def build(cls, group: _Group, block_size: int, device: torch.device) -> Padded:
        s = len(group.q_lens)
        max_q, max_ctx = max(group.q_lens), max(group.ctx_lens)
        max_blocks = -(-max_ctx // block_size)
        table = torch.zeros(s, max_blocks, dtype=torch.long)
        queries = torch.zeros(s, max_q, dtype=torch.long)
        real: list[int] = []
        out_rows: list[int] = []
        members = zip(group.q_lens, group.q_starts, group.tables, strict=True)
        for i, (q_len, first, blocks) in enumerate(members):
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
            queries[i, :q_len] = torch.arange(first, first + q_len)
            queries[i, q_len:] = first  # a padded row repeats a real one; its output is dropped
            real.extend(range(i * max_q, i * max_q + q_len))
            out_rows.extend(range(first, first + q_len))
        q_len = torch.tensor(group.q_lens)[:, None, None]
        ctx = torch.tensor(group.ctx_lens)[:, None, None]
        row = torch.arange(max_q)[None, :, None]
        key = torch.arange(max_ctx)[None, None, :]
        # Query r of a sequence sits at position ctx - q_len + r; a padded row sees what its last
        # real row sees, so no row of the call is empty.
        position = ctx - q_len + torch.minimum(row, q_len - 1)
        mask = ((key <= position) & (key < ctx))[:, None]
        uniform = all(c == max_ctx for c in group.ctx_lens) and all(q == 1 for q in group.q_lens)
        return cls(
            table=table.flatten().to(device),
            queries=queries.flatten().to(device),
            real=torch.tensor(real, dtype=torch.long, device=device),
            out_rows=torch.tensor(out_rows, dtype=torch.long, device=device),
            mask=None if uniform else mask.to(device),
            sequences=s,
            max_q=max_q,
            max_ctx=max_ctx,
            max_blocks=max_blocks,
        )


def attend_padded(
    q: torch.Tensor, kv_cache: torch.Tensor, group: _Group, block_size: int, out: torch.Tensor
) -> None:
    """The group's attention into its rows of `out` (T, H * D): one gather and one call."""
    if group.padded is None:
        group.padded = Padded.build(group, block_size, q.device)
    p: Padded = group.padded
    heads, dim, kv_heads = q.shape[1], q.shape[2], kv_cache.shape[3]
    blocks = kv_cache.index_select(0, p.table).view(p.sequences, p.max_blocks, 2, block_size, kv_heads, dim)
    keys = blocks[:, :, 0].reshape(p.sequences, -1, kv_heads, dim)[:, : p.max_ctx].transpose(1, 2)
    values = blocks[:, :, 1].reshape(p.sequences, -1, kv_heads, dim)[:, : p.max_ctx].transpose(1, 2)
    queries = q.index_select(0, p.queries).view(p.sequences, p.max_q, heads, dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(
        queries, keys.to(q.dtype), values.to(q.dtype), attn_mask=p.mask, enable_gqa=kv_heads != heads
    )
    flat = o.transpose(1, 2).reshape(p.sequences * p.max_q, heads * dim)
    out.index_copy_(0, p.out_rows, flat.index_select(0, p.real))
