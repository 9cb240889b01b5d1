"""Dense supervision for the vision tower while it trains: what each merged visual token covers.

One answer word per image is a weak signal for a vision tower learned from scratch: the decoder first
learns the answers' priors and then has to find a shape covering a few of 64 tokens, through attention
that starts uniform. Trained alone on the tasks, the model sat at its priors for hundreds of steps.
Linear probes on the merger's output, trained beside the tasks (and alone in the recipe's first
stage), give every token targets from the first step: what it covers (`HEADS`, each head's loss
weighing the few covered tokens as much as the background) and, from every token, the whole scene
(`SLOTS`). The probes are dropped at export, so the shipped checkpoint is a plain Qwen2-VL.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from serving.evals.drawing import COLOURS, Box, Shape, draw_shape
from serving.evals.prompts import DIRECTIONS, SHAPE_NAMES
from serving.evals.tasks import MOVES, Scene

# Per-token heads and their classes (0 is always "nothing of it here"): the colour under the token
# (the four colours, 5 = black ink), the kind of shape, the digit, the direction the shape moves; the
# colour of a shape whose centre falls in the token (one token per shape: what counting counts); for
# a shape with exactly one other in its image, whether it is the left or the right one (what `side`
# asks); and the digit under each of the token's four patches, in the order the merger concatenates
# them (a merged token is 28 px at the encoded size, wider than one digit: reading needs the order
# inside it). `GROUPS`: heads whose classes are several softmaxes side by side.
HEADS = {"colour": 6, "kind": 4, "digit": 11, "motion": 5, "centre": 5, "side": 3, "subdigit": 44}
GROUPS = {"subdigit": 4}
# Not a probe head: the share of each token's pixels inked by the number's first, second and third
# digit (0 = none), which the supervised reading attention (serving/training/focus.py) looks for.
PLACES = 4
TARGETS = {**HEADS, "place": PLACES}  # every per-token target `token_targets` returns, and its classes
CLASSES = HEADS["colour"]
_NEAR = 45  # per channel: the jitter plus room for resizing and the video codec
SAMPLES = 7  # pixels sampled along each side of a merged token (of its 28): cheap, and shares to 1/49


def class_map(image: Image.Image) -> np.ndarray:
    """(H, W) colour class of every pixel, read from the pixels."""
    p = np.asarray(image.convert("RGB")).astype(np.int16)
    out = np.zeros(p.shape[:2], dtype=np.int64)
    for k, rgb in enumerate(COLOURS.values(), start=1):
        out[(np.abs(p - np.array(rgb)) <= _NEAR).all(axis=-1)] = k
    out[p.max(axis=-1) < 100] = CLASSES - 1
    return out


def scene_maps(scene: Scene, size: tuple[int, int], frame: int) -> dict[str, np.ndarray]:
    """(H, W) kind, digit, place (which of the number's digits) and motion classes of every pixel,
    drawn again from the scene."""
    kind = Image.new("RGB", size)
    for shape in scene.shapes:
        box = shape.box
        if scene.direction is not None and scene.step is not None:
            dx, dy = MOVES[scene.direction]
            box = Box(box.x + dx * scene.step * frame, box.y + dy * scene.step * frame, box.size)
        k = 1 + SHAPE_NAMES.index(shape.kind)
        draw_shape(kind, Shape(shape.kind, shape.colour, box, (k, k, k)))
    kinds = np.asarray(kind)[..., 0].astype(np.int64)
    digits = np.zeros_like(kinds)
    places = np.zeros_like(kinds)
    if scene.number is not None and scene.font_size is not None and scene.text_origin is not None:
        text = str(scene.number)
        font = ImageFont.load_default(size=scene.font_size)
        canvas, order = Image.new("RGB", size), Image.new("RGB", size)
        draw, draw_order = ImageDraw.Draw(canvas), ImageDraw.Draw(order)
        draw.fontmode = draw_order.fontmode = "1"  # no anti-aliasing: every inked pixel is one class
        x, y = scene.text_origin
        for i, ch in enumerate(text):
            v = 1 + int(ch)
            at = (x + font.getlength(text[:i]), y)
            draw.text(at, ch, font=font, fill=(v, v, v))
            draw_order.text(at, ch, font=font, fill=(i + 1, i + 1, i + 1))
        digits = np.asarray(canvas)[..., 0].astype(np.int64)
        places = np.asarray(order)[..., 0].astype(np.int64)
    motion = np.zeros_like(kinds)
    if scene.direction is not None:
        motion[kinds > 0] = 1 + DIRECTIONS.index(scene.direction)
    side = np.zeros_like(kinds)
    if len(scene.shapes) == 2 and scene.direction is None:
        a, b = scene.shapes
        for shape, other in ((a, b), (b, a)):
            k = 1 + SHAPE_NAMES.index(shape.kind)
            mine = np.zeros_like(kinds)
            mine[kinds == k] = 1  # two shapes of one kind: each labelled by its own box below
            x0, y0, n = shape.box.x, shape.box.y, shape.box.size
            box = np.zeros_like(kinds, dtype=bool)
            box[max(0, y0) : y0 + n, max(0, x0) : x0 + n] = True
            side[(mine > 0) & box] = 1 if shape.box.centre[0] < other.box.centre[0] else 2
    return {"kind": kinds, "digit": digits, "place": places, "motion": motion, "side": side}


def _centres(scene: Scene, size: tuple[int, int], frame: int, gh: int, gw: int) -> np.ndarray:
    """(gh, gw) colour class (1-4) of the shape whose centre falls in each merged token, else 0."""
    out = np.zeros((gh, gw), dtype=np.int64)
    for shape in scene.shapes:
        cx, cy = shape.box.centre
        if scene.direction is not None and scene.step is not None:
            dx, dy = MOVES[scene.direction]
            cx, cy = cx + dx * scene.step * frame, cy + dy * scene.step * frame
        row = min(gh - 1, int(cy * gh / size[1]))
        col = min(gw - 1, int(cx * gw / size[0]))
        out[row, col] = 1 + list(COLOURS).index(shape.colour)
    return out


def _subdigits(digits: np.ndarray, gh: int, gw: int, merge: int) -> np.ndarray:
    """(gh·gw, merge²·11): per merged token, the share of each digit class under each of its patches,
    patches in the merger's order (row-major inside the token)."""
    per = 4  # samples along a patch's side
    small = np.asarray(
        Image.fromarray(digits.astype(np.uint8)).resize(
            (gw * merge * per, gh * merge * per), resample=Image.Resampling.NEAREST
        )
    ).astype(np.int64)
    onehot = np.eye(11, dtype=np.float32)[small]  # (H, W, 11)
    shares = _inked(onehot.reshape(gh, merge, per, gw, merge, per, 11).mean(axis=(2, 5)))
    return shares.transpose(0, 2, 1, 3, 4).reshape(gh * gw, merge * merge * 11)


def _ink_shares(classes: np.ndarray, n: int, gh: int, gw: int) -> np.ndarray:
    """(gh, gw, n): the share of each token's area under each class, averaged over every pixel (a
    sampled grid misses thin strokes where the image is shrunk a lot)."""
    out = np.zeros((gh, gw, n), dtype=np.float32)
    for c in range(1, n):
        mask = Image.fromarray(((classes == c) * 255).astype(np.uint8))
        out[..., c] = np.asarray(mask.resize((gw, gh), resample=Image.Resampling.BOX)) / 255
    out[..., 0] = 1 - out[..., 1:].sum(-1)
    return out


def _shares(classes: np.ndarray, n: int, gh: int, gw: int) -> np.ndarray:
    onehot = np.eye(n, dtype=np.float32)[classes]  # (H, W, n)
    return onehot.reshape(gh, SAMPLES, gw, SAMPLES, n).mean(axis=(1, 3))


# A digit's strokes are thin: they cover a fifth of the patches they cross or less, so shares would
# call nearly every inked patch "nothing". A patch (or token) with this much ink is its main digit's.
INK = 0.08


def _inked(shares: np.ndarray) -> np.ndarray:
    """Shares over (none, digits) made one-hot: the main digit where ink covers at least INK."""
    ink = 1 - shares[..., 0]
    main = 1 + shares[..., 1:].argmax(-1)
    return np.eye(shares.shape[-1], dtype=np.float32)[np.where(ink >= INK, main, 0)]


def token_targets(
    frames: list[Image.Image], scene: Scene, grid: tuple[int, int, int], merge: int
) -> dict[str, torch.Tensor]:
    """Per head and `place`, (t·h·w/merge², classes): the share of each class in each merged token
    (sampled on a SAMPLES² grid per token of the frame the processor resizes), tokens in the order
    the vision tower emits them (time, row, column)."""
    t, gh, gw = grid
    gh, gw = gh // merge, gw // merge
    size = (gw * SAMPLES, gh * SAMPLES)
    per_frame = []
    for i, frame in enumerate(frames):
        maps = scene_maps(scene, frame.size, i)
        shares = {
            "colour": _shares(
                class_map(frame.resize(size, resample=Image.Resampling.NEAREST)), CLASSES, gh, gw
            )
        }
        for name, m in maps.items():
            if name == "place":
                continue  # by area, below
            small = np.asarray(
                Image.fromarray(m.astype(np.uint8)).resize(size, resample=Image.Resampling.NEAREST)
            )
            shares[name] = _shares(small.astype(np.int64), TARGETS[name], gh, gw)
        shares["digit"] = _inked(shares["digit"])
        centres = _centres(scene, frame.size, i, gh, gw)
        shares["centre"] = np.eye(HEADS["centre"], dtype=np.float32)[centres]
        shares["subdigit"] = _subdigits(maps["digit"], gh, gw, merge).reshape(gh, gw, -1)
        shares["place"] = _ink_shares(maps["place"], PLACES, gh, gw)
        per_frame.append(shares)
    per_frame += [per_frame[-1]] * (-len(per_frame) % t)  # the processor repeats the last frame so
    out = {}
    for name, n in TARGETS.items():
        stacked = np.stack([f[name] for f in per_frame]).reshape(t, -1, gh, gw, n).mean(axis=1)
        out[name] = torch.from_numpy(stacked.reshape(-1, n))
    return out


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
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in HEADS.items()})
        self.scene = nn.Linear(hidden, sum(SLOTS))
        self.outputs: list[torch.Tensor] = []
        model.model.visual.merger.register_forward_hook(lambda _m, _i, out: self.outputs.append(out))

    def loss(
        self, targets: dict[str, torch.Tensor], scene: torch.Tensor, scene_weight: float = 1.0
    ) -> torch.Tensor:
        features = torch.cat(self.outputs)
        self.outputs.clear()
        local = sum(_balanced(targets[name], head(features), name) for name, head in self.heads.items())
        if not scene_weight:
            return local
        logits = self.scene(features).split(SLOTS, dim=-1)
        whole = sum(F.cross_entropy(lg, scene[:, i]) for i, lg in enumerate(logits)) / len(SLOTS)
        return local + scene_weight * whole

    @torch.no_grad()
    def accuracy(self, targets: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per head, how often the argmax is the main class of the tokens that cover something (class
        0's share under a half): what the tower has learned to see, logged while it trains."""
        features = torch.cat(self.outputs)
        self.outputs.clear()
        out = {}
        for name, head in self.heads.items():
            target, logits = _grouped(targets[name], name), _log_probs(head(features), name)
            covered = target[..., 0] < 0.5
            if covered.any():
                hits = target.argmax(-1)[covered] == logits.argmax(-1)[covered]
                out[name] = round(hits.float().mean().item(), 3)
        return out


def _balanced(target: torch.Tensor, logits: torch.Tensor, name: str) -> torch.Tensor:
    """Cross-entropy averaged over the tokens that cover something and, apart, over those that do
    not, then added: most tokens are background, and a plain mean let the heads whose things are
    rare (a video's motion, a number's digits, the side of one of two shapes) learn "nothing here"
    everywhere and stop."""
    target = _grouped(target, name)
    loss = -(target * _log_probs(logits, name)).sum(-1)
    covered = target[..., 0] < 0.5
    parts = [loss[mask].mean() for mask in (covered, ~covered) if mask.any()]
    return sum(parts) if parts else loss.sum() * 0


def _grouped(x: torch.Tensor, name: str) -> torch.Tensor:
    return x.unflatten(-1, (GROUPS[name], -1)) if name in GROUPS else x


def _log_probs(logits: torch.Tensor, name: str) -> torch.Tensor:
    return torch.log_softmax(_grouped(logits, name), dim=-1)
