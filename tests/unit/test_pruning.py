"""Visual-token pruning at the encoder: the kept count is a pure function of grid and rate, EVS keeps
the first temporal patch and the most changed tokens, DivPrune keeps distinct tokens before repeats,
the random baseline keeps the count asked, and M-RoPE gives every kept token its whole-grid position
while the text after the item keeps the position it had unpruned."""

from __future__ import annotations

import torch

from serving.engine import pruning
from serving.engine.mrope import mrope_positions

IMG, VID = 5, 6


def test_kept_count():
    assert pruning.kept_count((1, 8, 8), 2, 0.0, False) == 16
    assert pruning.kept_count((1, 8, 8), 2, 0.5, False) == 8
    assert pruning.kept_count((1, 8, 8), 2, 0.99, False) == 1
    # a video keeps at least one temporal patch's worth
    assert pruning.kept_count((4, 8, 8), 2, 0.9, True) == 16
    assert pruning.kept_count((4, 8, 8), 2, 0.5, True) == 32


def test_evs_keeps_the_first_patch_and_the_most_changed():
    per_patch, patches = 4, 3
    base = torch.randn(per_patch, 8)
    video = base.repeat(patches, 1)
    video[6] = -base[2]  # patch 1, place 2: changed (and so is place 2 of patch 2, from it)
    video[9] = base[1] + 0.5 * torch.randn(8)  # patch 2, place 1: changed a little
    kept = pruning.select(video, (patches, 4, 4), 2, 7, True, "evs")
    assert kept.tolist() == [0, 1, 2, 3, 6, 9, 10]
    again = pruning.select(video, (patches, 4, 4), 2, 7, True, "evs")
    assert torch.equal(kept, again)


def test_divprune_takes_distinct_tokens_before_repeats():
    torch.manual_seed(0)
    distinct = torch.randn(4, 16)
    tokens = torch.cat([distinct, distinct, distinct])  # each direction three times
    kept = pruning.select(tokens, (1, 6, 8), 2, 4, False, "divprune")
    assert len(kept) == 4 and sorted({int(i) % 4 for i in kept}) == [0, 1, 2, 3]


def test_random_baseline_keeps_the_count_and_the_first_patch():
    kept = pruning.select(torch.randn(24, 8), (3, 4, 8), 2, 12, True, "random")
    assert (
        len(kept) == 12
        and kept[:8].tolist() == list(range(8))
        and kept.tolist() == sorted(set(kept.tolist()))
    )
    image = pruning.select(torch.randn(24, 8), (1, 8, 12), 2, 5, False, "random")
    assert len(image) == 5 and torch.equal(
        image, pruning.select(torch.randn(24, 8), (1, 8, 12), 2, 5, False, "random")
    )


def test_mrope_positions_of_kept_tokens():
    grid, merge = (1, 4, 6), 2  # 2 × 3 merged tokens
    whole = [1, 2] + [IMG] * 6 + [3, 4]
    full, delta = mrope_positions(whole, [grid], IMG, merge)
    kept = [0, 4, 5]
    pruned = [1, 2] + [IMG] * 3 + [3, 4]
    pos, pruned_delta = mrope_positions(pruned, [grid], IMG, merge, keep=[3], kept=[kept])
    assert torch.equal(pos[:, 2:5], full[:, [2 + k for k in kept]])
    assert torch.equal(pos[:, 5:], full[:, 8:]), "the text after the item is where it was unpruned"
    assert pruned_delta == delta + 3
    # kept tokens unknown (all in a cached prefix): the text after them is still exact
    unknown, _ = mrope_positions(pruned, [grid], IMG, merge, keep=[3], kept=[None])
    assert torch.equal(unknown[:, 5:], full[:, 8:])
