"""Visual-KV compaction at the prefill→decode handoff (SnapKV-style): the prefill worker scores each
prompt position by the attention the prompt's last `WINDOW` positions pay it, summed over heads and
layers; it keeps every text token and the best-scored share (`SamplingParams.visual_kv_budget`) of
the visual ones, and hands only those rows of KV to the decode worker.

Keys carry their rotary positions already, so the kept rows need nothing but a shorter table; the
decode worker's rope delta grows by the number dropped, so every later token sits where it would
have. The prefill worker's own KV (and prefix cache) stays whole. The scores come from the prompt
alone, so a re-prefill after a decode migration keeps the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WINDOW = 16  # the prompt's last positions whose attention scores the rest


@dataclass
class Observer:
    """One sequence in a step whose queries include some of its window: where they are in the
    step's packed rows, the positions they sit at, its context and block table, and the running
    scores (float32, one per prompt position) they add to."""

    rows: torch.Tensor  # indices into the step's packed tokens
    positions: torch.Tensor  # the positions of those rows in the sequence
    ctx: int
    table: torch.Tensor  # block ids (long, on the pool's device)
    scores: torch.Tensor


def window(prompt_len: int) -> tuple[int, int]:
    return max(0, prompt_len - WINDOW), prompt_len


def observe(q: torch.Tensor, kv_cache: torch.Tensor, observers: list[Observer]) -> None:
    """Add one layer's attention from each observer's window queries to its scores. `q` (T, H, D)
    rotated, `kv_cache` the layer's pool (blocks, 2, block_size, KV, D) with this step's keys in."""
    kv_heads, dim = kv_cache.shape[3], kv_cache.shape[4]
    heads = q.shape[1]
    for ob in observers:
        keys = kv_cache[ob.table, 0].reshape(-1, kv_heads, dim)[: ob.ctx].float()  # (ctx, KV, D)
        query = q[ob.rows].float().view(len(ob.rows), kv_heads, heads // kv_heads, dim)
        logits = torch.einsum("qkgd,ckd->qkgc", query, keys) / dim**0.5
        hidden = torch.arange(ob.ctx, device=q.device)[None, :] > ob.positions[:, None]  # causal
        logits.masked_fill_(hidden[:, None, None, :], float("-inf"))
        ob.scores[: ob.ctx] += logits.softmax(-1).sum(dim=(0, 1, 2)).to(ob.scores.device)


def select(
    scores: torch.Tensor,
    token_ids: list[int],
    pads: tuple[int, ...],
    budget: float,
    length: int,
    method: str = "snapkv",
) -> list[int]:
    """The positions (ascending) of a sequence of `length` tokens whose KV to keep: every position
    that is not a visual pad of the prompt (`token_ids`), and the `budget` share of the visual ones
    with the highest scores (at least one; ties to the earlier) — or, with `method` "random", as
    many chosen at random (a fixed seed): the baseline the scores must beat."""
    visual = [i for i, t in enumerate(token_ids) if t in pads]
    if not visual or budget >= 1:
        return list(range(length))
    keep = max(1, round(len(visual) * budget))
    if method == "random":
        generator = torch.Generator().manual_seed(len(visual) * 7919 + keep)
        order = torch.randperm(len(visual), generator=generator)[:keep]
    else:
        order = torch.sort(-scores[torch.tensor(visual)], stable=True).indices[:keep]
    chosen = {visual[int(i)] for i in order}
    dropped = set(visual) - chosen
    return [i for i in range(length) if i not in dropped]


def gather(pool_data: torch.Tensor, table: list[int], kept: list[int], into: list[int]) -> None:
    """Copy the kept positions' KV (every layer) from `table` into the blocks `into`, packed from
    the first slot: position kept[i] lands at slot i."""
    block_size = pool_data.shape[3]
    device = pool_data.device
    src = torch.tensor(kept, dtype=torch.long, device=device)
    src_blocks = torch.tensor(table, dtype=torch.long, device=device)[src // block_size]
    dst = torch.arange(len(kept), device=device)
    dst_blocks = torch.tensor(into, dtype=torch.long, device=device)[dst // block_size]
    rows = pool_data[src_blocks, :, :, src % block_size]  # (n, layers, 2, KV, D)
    pool_data[dst_blocks, :, :, dst % block_size] = rows
