"""Visual-token pruning at the encoder: which of an item's merged visual tokens to keep.

The kept count is a pure function of the item's grid and the rate (`kept_count`), so the gateway
lays out exactly that many pads before anything is encoded; which tokens are kept is decided on the
encoder's output, and their indices (in the item's (t, h, w) raster order) travel with the
embeddings so that M-RoPE gives every kept token the position it had in the whole grid.

- Videos, EVS (vLLM's efficient video sampling): the first temporal patch is kept whole; every
  other token is scored by how much it changed from the token at the same place in the previous
  temporal patch (1 − cosine similarity), and the most changed are kept.
- Images, DivPrune (max-min diversity, training-free): greedily keep the token farthest (cosine
  distance) from everything kept so far, starting from the one farthest from all others on
  average. Chosen over attention-based selection (VisionZip) because it needs only the encoder's
  output, not attention weights the fused attention kernels never materialise, and it is the same
  on every backend.
- `random`: the baseline at the same budget (a fixed seed; a video's first temporal patch kept
  whole, as EVS keeps it), which a method must beat to be worth its cost.
"""

from __future__ import annotations

import math

import torch

METHODS = ("divprune", "evs", "random")


def kept_count(grid: tuple[int, int, int], merge: int, rate: float, video: bool) -> int:
    """Tokens an item keeps at pruning `rate` (0: all). A video keeps at least one temporal patch's
    worth, an image at least one token."""
    t, h, w = grid
    total = t * h * w // (merge * merge)
    if rate <= 0:
        return total
    floor = total // t if video else 1
    return min(total, max(floor, round(total * (1 - rate))))


def select(
    embeds: torch.Tensor, grid: tuple[int, int, int], merge: int, keep: int, video: bool, method: str
) -> torch.Tensor:
    """Indices (ascending, int64, on CPU) of the `keep` rows of one item's embeddings to keep."""
    total = embeds.shape[0]
    if keep >= total:
        return torch.arange(total)
    per_patch = total // grid[0]
    if method == "random":
        return _random(total, keep, per_patch if video else 0)
    if video:
        return _evs(embeds, per_patch, keep)
    return _divprune(embeds, keep)


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _evs(embeds: torch.Tensor, per_patch: int, keep: int) -> torch.Tensor:
    unit = _unit(embeds)
    change = torch.full((embeds.shape[0],), math.inf, device=embeds.device)
    change[per_patch:] = 1 - (unit[per_patch:] * unit[:-per_patch]).sum(-1)
    # Stable: equal scores keep the earlier token, so the choice is the same on every run.
    order = torch.sort(-change, stable=True).indices[:keep]
    return torch.sort(order).values.cpu()


def _divprune(embeds: torch.Tensor, keep: int) -> torch.Tensor:
    # Distances one row at a time (O(N) memory, not the N × N matrix: a large image has thousands of
    # tokens). A token's mean cosine distance to all is 1 − its unit vector · the mean unit vector.
    # Picks stay on the device (no host sync per kept token on a GPU).
    unit = _unit(embeds)
    pick = torch.argmax(1 - unit @ unit.mean(dim=0))
    chosen = torch.empty(keep, dtype=torch.long, device=embeds.device)
    nearest = torch.full((embeds.shape[0],), math.inf, device=embeds.device)
    for i in range(keep):
        chosen[i] = pick
        # Chosen tokens stay at -inf: the minimum keeps them there, so only the new one is set.
        nearest = torch.minimum(nearest, 1 - unit @ unit[pick])
        nearest.index_fill_(0, pick.view(1), -math.inf)
        pick = torch.argmax(nearest)
    return torch.sort(chosen).values.cpu()


def _random(total: int, keep: int, whole: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(total * 7919 + keep)
    rest = torch.randperm(total - whole, generator=generator)[: keep - whole] + whole
    return torch.sort(torch.cat([torch.arange(whole), rest])).values
