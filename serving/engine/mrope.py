"""M-RoPE positions of a prompt, computed from its own tokens and its images' and videos' grids.

Text tokens advance all three coordinates together. An image's (or a video's) tokens take (t, h, w)
coordinates of its merged grid, offset by the position where it starts; the text after it resumes at
that offset plus its largest spatial side. For a video that is Qwen2-VL's rule as `transformers`
computes it: one temporal step per temporal patch, and the temporal extent does not move the text
after it. The gap between the last position and the token count is the request's rope delta: every
decoded token sits at `index + delta` on all three axes.
"""

from __future__ import annotations

import torch


def mrope_positions(
    token_ids: list[int],
    grids: list[tuple[int, int, int]],
    image_token_id: int,
    merge: int,
    video_token_id: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Returns positions (3, len(token_ids)) and the rope delta. `grids` are the images' and videos'
    grids in the order their pad runs appear in the prompt."""
    n = len(token_ids)
    positions = torch.empty(3, n, dtype=torch.long)
    ids = torch.tensor(token_ids, dtype=torch.long)
    pads = ids == image_token_id
    if video_token_id is not None:
        pads |= ids == video_token_id
    image_starts = _media_runs(pads, grids, merge)
    cursor = 0  # next token index to place
    pos = 0  # next text position
    for start, (t, h, w) in zip(image_starts, grids, strict=True):
        text_len = start - cursor
        positions[:, cursor:start] = torch.arange(pos, pos + text_len)
        pos += text_len
        gt, gh, gw = t, h // merge, w // merge
        tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
        positions[:, start : start + gt * gh * gw] = torch.stack([tt, hh, ww]).reshape(3, -1) + pos
        cursor = start + gt * gh * gw
        pos += max(gh, gw)
    positions[:, cursor:] = torch.arange(pos, pos + n - cursor)
    last = pos + n - cursor - 1 if n > cursor else int(positions.max())
    return positions, last + 1 - n


def _media_runs(pads: torch.Tensor, grids: list[tuple[int, int, int]], merge: int) -> list[int]:
    """Start index of each image's or video's pad-token run, checked against the count its grid needs."""
    where = pads.nonzero().flatten().tolist()
    starts: list[int] = []
    i = 0
    for t, h, w in grids:
        size = t * h * w // (merge * merge)
        if i + size > len(where) or where[i + size - 1] - where[i] != size - 1:
            raise ValueError("image pad tokens do not match the image grids")
        starts.append(where[i])
        i += size
    if i != len(where):
        raise ValueError("more image pad tokens than the images need")
    return starts
