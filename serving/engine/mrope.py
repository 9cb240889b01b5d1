"""M-RoPE positions of a prompt, computed from its own tokens and its images' and videos' grids.

Text tokens advance all three coordinates together. An image's (or a video's) tokens take (t, h, w)
coordinates of its merged grid, offset by the position where it starts; the text after it resumes at
that offset plus its largest spatial side (the temporal extent does not move it), as `transformers`
computes it. A video's temporal patch k sits at k · interval: 1 for Qwen2-VL, and for Qwen2.5-VL
`tokens_per_second` times the seconds the patch spans, truncated. The gap between the largest
position and the token count is the request's rope delta: every decoded token sits at
`index + delta` on all three axes.

An item pruned at the encoder (`serving.engine.pruning`) has a shorter pad run: its kept tokens take
the positions they had in the whole grid (`kept`, per item, indices in (t, h, w) raster order), and
the text after it, and the rope delta, stay where they would be without pruning (the delta counts
the whole grid's largest position), so decoded tokens sit where they would have.
"""

from __future__ import annotations

import torch


def mrope_positions(
    token_ids: list[int],
    grids: list[tuple[int, int, int]],
    image_token_id: int,
    merge: int,
    video_token_id: int | None = None,
    video_seconds: list[float] | None = None,
    tokens_per_second: float | None = None,
    keep: list[int] | None = None,
    kept: list[list[int] | None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Returns positions (3, len(token_ids)) and the rope delta. `grids` are the images' and videos'
    grids in the order their pad runs appear in the prompt. With `tokens_per_second` (Qwen2.5-VL), a
    video's temporal step is it times the video's entry in `video_seconds` (1.0 when missing);
    without it, 1. `keep`: per item, how many tokens pruning kept (empty: all); `kept`: which (None
    for an item kept whole, or whose kept tokens all lie in a cached prefix and are never computed:
    they then take the grid's first positions, and everything after them is exact)."""
    n = len(token_ids)
    positions = torch.empty(3, n, dtype=torch.long)
    ids = torch.tensor(token_ids, dtype=torch.long)
    pads = ids == image_token_id
    if video_token_id is not None:
        pads |= ids == video_token_id
    kept = list(kept) if kept else [None] * len(grids)
    sizes = [t * h * w // (merge * merge) for t, h, w in grids]
    if keep:
        sizes = list(keep)
    image_starts = _media_runs(pads, sizes)
    seconds = iter(video_seconds or ())
    cursor = 0  # next token index to place
    pos = 0  # next text position
    top = -1  # the largest position of any item's whole grid: pruning must not move the rope delta
    for start, (t, h, w), chosen, size in zip(image_starts, grids, kept, sizes, strict=True):
        text_len = start - cursor
        positions[:, cursor:start] = torch.arange(pos, pos + text_len)
        pos += text_len
        gt, gh, gw = t, h // merge, w // merge
        temporal = torch.arange(gt)
        if video_token_id is not None and token_ids[start] == video_token_id:
            step = next(seconds, 1.0)
            if tokens_per_second is not None:
                temporal = (temporal * (tokens_per_second * step)).long()
        tt, hh, ww = torch.meshgrid(temporal, torch.arange(gh), torch.arange(gw), indexing="ij")
        grid_positions = torch.stack([tt, hh, ww]).reshape(3, -1)
        top = max(top, int(grid_positions.max()) + pos)
        if chosen is not None:
            grid_positions = grid_positions[:, torch.as_tensor(chosen, dtype=torch.long)]
        grid_positions = grid_positions[:, :size]
        positions[:, start : start + size] = grid_positions + pos
        cursor = start + size
        pos += max(gh, gw)
    positions[:, cursor:] = torch.arange(pos, pos + n - cursor)
    return positions, max(int(positions.max()), top) + 1 - n if n else 0


def _media_runs(pads: torch.Tensor, sizes: list[int]) -> list[int]:
    """Start index of each image's or video's pad-token run, checked against the count it needs."""
    where = pads.nonzero().flatten().tolist()
    starts: list[int] = []
    i = 0
    for size in sizes:
        if i + size > len(where) or where[i + size - 1] - where[i] != size - 1:
            raise ValueError("image pad tokens do not match the image grids")
        starts.append(where[i])
        i += size
    if i != len(where):
        raise ValueError("more image pad tokens than the images need")
    return starts
