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
import torch.nn.functional as F
from PIL import Image
from torch import nn

from serving.evals.drawing import COLOURS
from serving.evals.prompts import SHAPE_NAMES
from serving.evals.tasks import Scene

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


# The scene as every token should know it: how many shapes of each colour and kind, the digits of a
# number (units, tens, hundreds; 10 = none), the direction of motion, the colour of the leftmost shape.
SLOTS = (6, 6, 6, 6, 6, 6, 6, 11, 11, 11, 5, 5)
_DIRECTIONS = (None, "left", "right", "up", "down")


def scene_slots(scene: Scene) -> torch.Tensor:
    colours = [sum(s.colour == c for s in scene.shapes) for c in COLOURS]
    kinds = [sum(s.kind == k for s in scene.shapes) for k in SHAPE_NAMES]
    digits = [10, 10, 10]
    if scene.number is not None:
        for i, ch in enumerate(reversed(str(scene.number))):
            digits[i] = int(ch)
    leftmost = min(scene.shapes, key=lambda s: s.box.centre[0]).colour if scene.shapes else None
    left = 0 if leftmost is None else 1 + list(COLOURS).index(leftmost)
    motion = _DIRECTIONS.index(scene.direction)
    return torch.tensor([*colours, *kinds, *digits, motion, left])


class MergerProbe(nn.Module):
    """Linear probes on the merger's output, fed by a forward hook with the last call's outputs in call
    order (images, then videos, as the model encodes them): what each token covers, and the whole
    scene (`SLOTS`) from every token. The second teaches the tower to spread what the questions ask
    about over all of an image's tokens, where the decoder's attention, uniform at first, finds it."""

    def __init__(self, model: nn.Module, hidden: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, CLASSES)
        self.scene = nn.Linear(hidden, sum(SLOTS))
        self.outputs: list[torch.Tensor] = []
        model.model.visual.merger.register_forward_hook(lambda _m, _i, out: self.outputs.append(out))

    def loss(self, targets: torch.Tensor, scene: torch.Tensor) -> torch.Tensor:
        features = torch.cat(self.outputs)
        self.outputs.clear()
        local = -(targets * torch.log_softmax(self.head(features), dim=-1)).sum(-1).mean()
        logits = self.scene(features).split(SLOTS, dim=-1)
        whole = sum(F.cross_entropy(lg, scene[:, i]) for i, lg in enumerate(logits)) / len(SLOTS)
        return local + whole
