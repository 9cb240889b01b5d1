"""The Triton backend (CUDA): one kernel launch per layer for a step's whole mixed prefill/decode batch,
reading keys and values from the block-major pool where they lie.

A step's first layer cuts every sequence's new tokens into tiles of `BLOCK_M` query rows (the layout is
kept on the batch for the other layers); the kernel runs one program per (tile, head): it loads the
tile's queries, walks the sequence's blocks up to the tile's last visible position, and keeps a
flash-attention running maximum, sum and weighted value in float32 (online softmax), so no score matrix
is ever stored. Causal masking is by absolute position (query r of a sequence with context c and n new
tokens sits at c - n + r), which covers a whole prompt, a chunk after cached tokens and a decode token
alike. A decode token's tile is grouped: its rows are the query heads that share a KV head (GQA: 7 of
them in Qwen2.5-VL-7B), one program per KV head, so a decode step reads each KV head's blocks once
rather than once per query head — decode attention is a read of the context, and that read was 7x.

Why Triton rather than a vendored CUDA library: it ships with every CUDA PyTorch, compiles for the card
it finds, and the same kernel runs on the CPU under `TRITON_INTERPRET=1`, which is how the CPU test
suite checks it against the reference (tests/unit/test_attention_backends.py). What it does not do yet:
split a long context across programs (flash-decoding), which matters when a few sequences at long
contexts leave most of the GPU's multiprocessors idle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from serving.engine.attention import AttentionBatch
from serving.engine.backends import AttentionBackend, write_kv
from serving.engine.backends.pointwise import Pointwise

BLOCK_M = 16  # query rows per program (tl.dot needs 16 or more)
GROUPED = -1  # a tile's first row when its rows are one token's query heads that share a KV head


@cache
def available() -> bool:
    """Triton imports, and it can run here (a CUDA device, or the CPU interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class TritonPlan:
    """Per step: each sequence's rows, context and blocks, and the tiles the kernel runs."""

    q_start: torch.Tensor  # (S,) int32, first batch row of each sequence's new tokens
    q_len: torch.Tensor  # (S,) int32
    ctx: torch.Tensor  # (S,) int32
    block_start: torch.Tensor  # (S,) int32, first entry in `blocks`
    blocks: torch.Tensor  # (P,) int32, the sequences' used blocks, packed
    tile_seq: torch.Tensor  # (tiles,) int32
    tile_row: torch.Tensor  # (tiles,) int32, the tile's first query row within its sequence, or GROUPED
    tiles: int


class TritonBackend(AttentionBackend):
    name = "triton"

    def pointwise(self) -> Pointwise:
        from serving.engine.backends.triton_pointwise import TritonPointwise

        return TritonPointwise()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, batch)
        plan = batch.extra
        if plan is None:  # the step's first layer lays out the tiles every layer then reuses
            plan = batch.extra = tile_plan(batch, q.device, q.shape[1] // kv_cache.shape[3])
        out = torch.empty_like(q)
        paged_attention_triton(q, kv_cache, plan, out)
        return out.view(q.shape[0], -1)


def tile_plan(batch: AttentionBatch, device: torch.device, heads_per_kv: int = 1) -> TritonPlan:
    """The kernel's view of a plan: its groups' sequences (each with its first batch row and used
    blocks, as the plan already holds them; the kernel needs no batch order) and their tiles. A
    sequence with one new token (a decode token) is one tile of its KV heads' query heads
    (`heads_per_kv` of them, when they fit a tile: `GROUPED`); a longer one, tiles of `BLOCK_M`
    positions."""
    q_start, q_len, ctx, block_start, blocks, tile_seq, tile_row = [], [], [], [], [], [], []
    for group in (batch.decode, batch.prompt):
        if group is None:
            continue
        for first, n, c, table in zip(
            group.q_starts, group.q_lens, group.ctx_lens, group.tables, strict=True
        ):
            for row in [GROUPED] if n == 1 and heads_per_kv <= BLOCK_M else range(0, n, BLOCK_M):
                tile_seq.append(len(q_start))
                tile_row.append(row)
            q_start.append(first)
            q_len.append(n)
            ctx.append(c)
            block_start.append(len(blocks))
            blocks.extend(table)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

    return TritonPlan(
        q_start=ints(q_start),
        q_len=ints(q_len),
        ctx=ints(ctx),
        block_start=ints(block_start),
        blocks=ints(blocks),
        tile_seq=ints(tile_seq),
        tile_row=ints(tile_row),
        tiles=len(tile_seq),
    )


def paged_attention_triton(
    q: torch.Tensor, kv_cache: torch.Tensor, plan: TritonPlan, out: torch.Tensor
) -> None:
    """q and out (T, H, D) contiguous; kv_cache one layer of the pool, (blocks, 2, block_size, KV, D)
    with each (KV, D) slot contiguous."""
    import triton

    tokens, heads, dim = q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    if kv_cache.stride(4) != 1 or kv_cache.stride(3) != dim:
        raise ValueError("the pool layer's (kv head, dim) rows must be contiguous")
    if plan.tiles == 0:
        return
    _kernel()[(plan.tiles, heads)](
        q,
        kv_cache,
        out,
        plan.q_start,
        plan.q_len,
        plan.ctx,
        plan.block_start,
        plan.blocks,
        plan.tile_seq,
        plan.tile_row,
        q.stride(0),
        q.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        out.stride(0),
        out.stride(1),
        1.0 / math.sqrt(dim),
        block_size,
        dim,
        GROUP=heads // kv_heads,
        BLOCK_M=BLOCK_M,
        BLOCK_N=max(16, triton.next_power_of_2(block_size)),
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        # Both products in float32 (the pool's bfloat16 is widened as it is read): exact ("ieee") for a
        # float32 model, TF32 on the tensor cores for a bfloat16 one, whose inputs carry less.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


@cache
def _kernel():  # noqa: ANN202 - a triton.JITFunction, built on first use so importing needs no Triton
    import triton
    import triton.language as tl

    @triton.jit
    def paged_attention_kernel(
        Q,
        KV,
        Out,
        QStart,
        QLen,
        Ctx,
        BlockStart,
        Blocks,
        TileSeq,
        TileRow,
        stride_qt,
        stride_qh,
        stride_block,
        stride_kind,
        stride_slot,
        stride_ot,
        stride_oh,
        scale,
        block_size,
        dim,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        tile = tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.load(TileSeq + tile)
        first_row = tl.load(TileRow + tile)
        q_start = tl.load(QStart + seq)
        q_len = tl.load(QLen + seq)
        ctx = tl.load(Ctx + seq)
        block_start = tl.load(BlockStart + seq)
        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < dim

        # A grouped tile (one decode token) is run by the programs of its first kv_heads head indices,
        # each taking the GROUP query heads of one KV head: the KV head's keys and values are read once
        # for all of them, not once per query head (the tile's other programs read and write nothing).
        # Otherwise the program's rows are BLOCK_M positions of one head.
        grouped = first_row < 0
        active = (not grouped) | (head < tl.num_programs(1) // GROUP)
        kv_head = tl.where(grouped, head, head // GROUP)
        rows = tl.maximum(first_row, 0) + r  # positions within the sequence's new tokens
        row_ok = tl.where(grouped, r < GROUP, rows < q_len) & active
        token = tl.where(grouped, q_start, q_start + rows)  # each row's batch row
        row_head = tl.where(grouped, head * GROUP + r, head)  # and query head
        q = tl.load(
            Q + token[:, None] * stride_qt + row_head[:, None] * stride_qh + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        # Each query's absolute position: it sees keys up to it.
        position = tl.where(grouped, ctx - 1, ctx - q_len + rows)

        running_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # Keys past the tile's last query are never read.
        visible_end = tl.where(grouped, ctx, ctx - q_len + tl.minimum(first_row + BLOCK_M, q_len))
        visible_end = tl.where(active, visible_end, 0)
        slots = tl.arange(0, BLOCK_N)
        for b in range(0, tl.cdiv(visible_end, block_size)):
            block = tl.load(Blocks + block_start + b).to(tl.int64)
            key_pos = b * block_size + slots
            key_ok = (slots < block_size) & (key_pos < ctx)
            base = KV + block * stride_block + kv_head * dim
            offsets = slots[:, None] * stride_slot + d[None, :]
            load_ok = key_ok[:, None] & d_ok[None, :]
            k = tl.load(base + offsets, mask=load_ok, other=0.0).to(q.dtype)
            v = tl.load(base + stride_kind + offsets, mask=load_ok, other=0.0).to(q.dtype)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            scores = scores * scale
            seen = key_ok[None, :] & (key_pos[None, :] <= position[:, None])
            scores = tl.where(seen, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            weights = tl.exp(scores - new_max[:, None])
            correction = tl.exp(running_max - new_max)
            running_sum = running_sum * correction + tl.sum(weights, 1)
            acc = acc * correction[:, None] + tl.dot(weights, v, input_precision=PRECISION)
            running_max = new_max
        # A row that saw a key has a sum of at least 1 (its largest weight is exp(0)); the floor only
        # spares an idle program's rows a 0 / 0, and they are not stored.
        result = acc / tl.maximum(running_sum, 1.0)[:, None]
        tl.store(
            Out + token[:, None] * stride_ot + row_head[:, None] * stride_oh + d[None, :],
            result.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )

    return paged_attention_kernel
