"""The packed paged attention equals plain attention over each sequence's dense context, on random
ragged batches mixing decode tokens, whole prompts and chunks that continue a partly cached prompt."""

from __future__ import annotations

import math
import random

import pytest
import torch

from serving.engine.attention import AttentionBatch, paged_attention

HEADS, KV_HEADS, DIM, BLOCK = 8, 2, 16, 4


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q (q_len, H, D) at the last q_len positions of keys/values (ctx, KV, D): causal softmax attention."""
    q_len, ctx = q.shape[0], keys.shape[0]
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # (H, ctx, D)
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(DIM)  # (H, q_len, ctx)
    q_pos = torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(q_len, HEADS * DIM)


@pytest.mark.parametrize("seed", range(6))
def test_packed_attention_equals_dense_reference(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = 96
    layer = torch.randn(num_blocks, 2, BLOCK, KV_HEADS, DIM, dtype=torch.float64)
    k_cache, v_cache = layer[:, 0], layer[:, 1]
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered, out-of-order block tables
    q_lens, ctx_lens, tables = [], [], []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["decode", "prompt", "chunk"])
        ctx = rng.randint(1, 40)
        q_len = {"decode": 1, "prompt": ctx, "chunk": rng.randint(1, ctx)}[kind]
        n = -(-ctx // BLOCK) + rng.randint(0, 2)  # tables may hold spare blocks past the context
        tables.append([free.pop() for _ in range(n)])
        q_lens.append(q_len)
        ctx_lens.append(ctx)
    total = sum(q_lens)
    q = torch.randn(total, HEADS, DIM, dtype=torch.float64)
    k = torch.randn(total, KV_HEADS, DIM, dtype=torch.float64)
    v = torch.randn(total, KV_HEADS, DIM, dtype=torch.float64)
    before_k = k_cache.clone()

    batch = AttentionBatch.build(q_lens, ctx_lens, tables, BLOCK, torch.device("cpu"))
    out = paged_attention(q, k, v, layer, batch)

    t = 0
    for q_len, ctx, table in zip(q_lens, ctx_lens, tables, strict=True):
        rows = (
            torch.tensor([table[p // BLOCK] for p in range(ctx)]),
            torch.tensor([p % BLOCK for p in range(ctx)]),
        )
        keys, values = k_cache[rows], v_cache[rows]
        # The new tokens landed in their slots; what was cached before them is untouched.
        assert torch.equal(keys[ctx - q_len :], k[t : t + q_len])
        assert torch.equal(values[ctx - q_len :], v[t : t + q_len])
        assert torch.equal(keys[: ctx - q_len], before_k[rows][: ctx - q_len])
        torch.testing.assert_close(out[t : t + q_len], reference(q[t : t + q_len], keys, values))
        t += q_len


def test_wrong_context_differs_from_reference() -> None:
    """Negative control: attending over one token fewer than the context changes the output."""
    torch.manual_seed(0)
    layer = torch.randn(8, 2, BLOCK, KV_HEADS, DIM, dtype=torch.float64)
    q = torch.randn(1, HEADS, DIM, dtype=torch.float64)
    k = torch.randn(1, KV_HEADS, DIM, dtype=torch.float64)
    v = torch.randn(1, KV_HEADS, DIM, dtype=torch.float64)
    table = [5, 2, 7]
    full = paged_attention(q, k, v, layer.clone(), AttentionBatch.build([1], [10], [table], BLOCK, q.device))
    short = paged_attention(q, k, v, layer.clone(), AttentionBatch.build([1], [9], [table], BLOCK, q.device))
    assert not torch.allclose(full, short)
