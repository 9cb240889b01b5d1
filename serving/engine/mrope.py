"""M-RoPE positions of a prompt, computed from its own tokens and image grids.

Text tokens advance all three coordinates together. An image's tokens take (t, h, w) coordinates of
its merged grid, offset by the position where the image starts; the text after it resumes at that
offset plus the image's largest side. The gap between the last position and the token count is the
request's rope delta: every decoded token sits at `index + delta` on all three axes.
"""

from __future__ import annotations

import torch


def mrope_positions(
    token_ids: list[int], grids: list[tuple[int, int, int]], image_token_id: int, merge: int
) -> tuple[torch.Tensor, int]:
    """Returns positions (3, len(token_ids)) and the rope delta."""
    n = len(token_ids)
    positions = torch.empty(3, n, dtype=torch.long)
    ids = torch.tensor(token_ids, dtype=torch.long)
    image_starts = _image_runs(ids, grids, image_token_id, merge)
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


def _image_runs(
    ids: torch.Tensor, grids: list[tuple[int, int, int]], image_token_id: int, merge: int
) -> list[int]:
    """Start index of each image's pad-token run, checked against the token count its grid needs."""
    where = (ids == image_token_id).nonzero().flatten().tolist()
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
