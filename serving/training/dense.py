"""Dense supervision for the vision tower while it trains: what each merged visual token covers.

One answer word per image is a weak signal for a vision tower learned from scratch: the decoder first
learns the answers' priors and then has to find a shape covering a few of 64 tokens, through attention
that starts uniform. Trained alone on the tasks, the model sat at its priors for hundreds of steps. A
linear probe on the merger's output, trained beside the tasks to say which colour (or ink) each token
covers, gives every token a target from the first step; the probe is dropped at export, so the shipped
checkpoint is a plain Qwen2-VL.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from serving.evals.drawing import COLOURS

CLASSES = 6  # background, the four colours, black ink (numbers)
_NEAR = 45  # per channel: the jitter plus room for resizing and the video codec
SAMPLES = 7  # pixels sampled along each side of a merged token (of its 28): cheap, and shares to 1/49


def class_map(image: Image.Image) -> np.ndarray:
    """(H, W) class index of every pixel."""
    p = np.asarray(image.convert("RGB")).astype(np.int16)
    out = np.zeros(p.shape[:2], dtype=np.int64)
    for k, rgb in enumerate(COLOURS.values(), start=1):
        out[(np.abs(p - np.array(rgb)) <= _NEAR).all(axis=-1)] = k
    out[p.max(axis=-1) < 100] = CLASSES - 1
    return out


def token_targets(
    frames: list[Image.Image], grid: tuple[int, int, int], merge: int, patch: int
) -> torch.Tensor:
    """(t·h·w/merge², CLASSES): the share of each class in each merged token's pixels (sampled on a
    SAMPLES² grid per token of the image the processor resizes to), tokens in the order the vision
    tower emits them (time, row, column)."""
    t, gh, gw = grid
    unit = SAMPLES
    height, width = gh // merge * unit, gw // merge * unit
    maps = []
    for frame in frames:
        classes = class_map(frame.resize((width, height), resample=Image.Resampling.NEAREST))
        onehot = np.eye(CLASSES, dtype=np.float32)[classes]  # (H, W, C)
        maps.append(onehot.reshape(gh // merge, unit, gw // merge, unit, CLASSES).mean(axis=(1, 3)))
    maps += [maps[-1]] * (-len(maps) % t)  # the processor repeats the last frame the same way
    per_t = np.stack(maps).reshape(t, -1, gh // merge, gw // merge, CLASSES).mean(axis=1)
    return torch.from_numpy(per_t.reshape(-1, CLASSES))


class MergerProbe(nn.Module):
    """A linear probe on the merger's output, fed by a forward hook: the last call's outputs, in call
    order (images, then videos, as the model encodes them)."""

    def __init__(self, model: nn.Module, hidden: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, CLASSES)
        self.outputs: list[torch.Tensor] = []
        model.model.visual.merger.register_forward_hook(lambda _m, _i, out: self.outputs.append(out))

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        features = torch.cat(self.outputs)
        self.outputs.clear()
        logits = self.head(features)
        return -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
