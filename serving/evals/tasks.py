"""The shapes-world tasks: each item is one image (or video), one question and a one-word answer.

An item is a pure function of (seed, task, index): `item(seed, task, i)` draws the same bytes on every
machine. Training draws from its own seed space and evaluation from seeds never used in training, so
the same generator serves both without overlap (docs/evals.md has the whole contract).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from serving.evals import clips
from serving.evals.drawing import (
    COLOURS,
    VIDEO_SIDES,
    Box,
    Shape,
    canvas,
    draw_number,
    draw_shape,
    jittered,
    layout,
)
from serving.evals.prompts import DIRECTIONS, PROMPTS
from serving.evals.prompts import SHAPE_NAMES as SHAPES

TASKS = tuple(PROMPTS)
VIDEO_FRAMES = 8
STEP = (8, 14)  # pixels a video's shape moves per frame
MOVES = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) of each direction


@dataclass(frozen=True)
class Scene:
    """What was drawn: enough to re-derive the answer (the tests do, from the pixels)."""

    shapes: tuple[Shape, ...] = ()  # a video's: its shape in the first frame
    number: int | None = None
    font_size: int | None = None
    text_origin: tuple[int, int] | None = None  # where the number was drawn (Pillow's text anchor)
    direction: str | None = None
    step: int | None = None  # pixels a video's shape moves per frame


@dataclass(frozen=True)
class Item:
    task: str
    index: int
    prompt: str
    answer: str
    kind: Literal["image", "video"]
    media: bytes  # PNG for an image, MP4 for a video
    scene: Scene

    @property
    def mime(self) -> str:
        return "image/png" if self.kind == "image" else "video/mp4"

    def image(self) -> Image.Image:
        with Image.open(io.BytesIO(self.media)) as im:
            return im.convert("RGB")

    def frames(self) -> list[Image.Image]:
        return clips.decode_frames(self.media)


def rng_for(seed: int, task: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASKS.index(task), index])


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _shapes(rng: np.random.Generator, image: Image.Image, specs: list[tuple[str, str]]) -> tuple[Shape, ...]:
    shapes = layout(rng, image.width, image.height, specs)
    for shape in shapes:
        draw_shape(image, shape)
    return tuple(shapes)


def _colour(rng: np.random.Generator) -> tuple[str, str, Image.Image, Scene]:
    image = canvas(rng)
    kind, colour = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS))
    scene = Scene(_shapes(rng, image, [(kind, colour)]))
    return PROMPTS["colour"].format(shape=kind), colour, image, scene


def _shape(rng: np.random.Generator) -> tuple[str, str, Image.Image, Scene]:
    image = canvas(rng)
    kind, colour = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS))
    scene = Scene(_shapes(rng, image, [(kind, colour)]))
    return PROMPTS["shape"].format(colour=colour), kind, image, scene


def _random_specs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    return [(_pick(rng, SHAPES), _pick(rng, tuple(COLOURS))) for _ in range(n)]


def _count(rng: np.random.Generator) -> tuple[str, str, Image.Image, Scene]:
    image = canvas(rng)
    n = int(rng.integers(1, 6))
    scene = Scene(_shapes(rng, image, _random_specs(rng, n)))
    return PROMPTS["count"], str(n), image, scene


def _count_colour(rng: np.random.Generator) -> tuple[str, str, Image.Image, Scene]:
    """The asked-for count is drawn first (uniform over 0..n), so every answer is as likely."""
    image = canvas(rng)
    n = int(rng.integers(2, 6))
    k = int(rng.integers(0, n + 1))
    target = _pick(rng, tuple(COLOURS))
    others = [c for c in COLOURS if c != target]
    colours = [target] * k + [_pick(rng, others) for _ in range(n - k)]
    order = rng.permutation(n)
    specs = [(_pick(rng, SHAPES), colours[int(i)]) for i in order]
    scene = Scene(_shapes(rng, image, specs))
    return PROMPTS["count_colour"].format(colour=target), str(k), image, scene


def _side(rng: np.random.Generator) -> tuple[str, str, Image.Image, Scene]:
    """Two shapes of different colours whose centres are at least a quarter of the width apart."""
    image = canvas(rng)
    first, second = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    specs = [(_pick(rng, SHAPES), first), (_pick(rng, SHAPES), second)]
    for _ in range(1000):
        trial = image.copy()
        shapes = _shapes(rng, trial, specs)
        if abs(shapes[0].box.centre[0] - shapes[1].box.centre[0]) >= image.width / 4:
            break
    else:  # pragma: no cover - a quarter of at least 224 px always fits
        raise RuntimeError("could not place two shapes apart")
    asked = int(rng.integers(2))
    other = 1 - asked
    answer = "left" if shapes[asked].box.centre[0] < shapes[other].box.centre[0] else "right"
    kind, colour = specs[asked]
    return PROMPTS["side"].format(colour=colour, shape=kind), answer, trial, Scene(shapes)


def _read(rng: np.random.Generator) -> tuple[str, str, Image.Image, Scene]:
    image = canvas(rng)
    number = int(rng.integers(0, 1000))
    size, origin = draw_number(rng, image, number)
    return PROMPTS["read"], str(number), image, Scene(number=number, font_size=size, text_origin=origin)


def motion_frames(rng: np.random.Generator) -> tuple[list[Image.Image], Shape, str, int]:
    """Eight frames on white, one shape moving 8-14 px a frame in one direction, always inside."""
    background = canvas(rng, VIDEO_SIDES, noise=False)
    kind, colour, direction = _pick(rng, SHAPES), _pick(rng, tuple(COLOURS)), _pick(rng, DIRECTIONS)
    step = int(rng.integers(STEP[0], STEP[1] + 1))
    size = int(rng.integers(36, 85))
    travel = step * (VIDEO_FRAMES - 1)
    dx, dy = MOVES[direction]
    # The start is drawn from where the whole path stays inside the frame.
    x_lo = travel if dx < 0 else 0
    x_hi = background.width - size - (travel if dx > 0 else 0)
    y_lo = travel if dy < 0 else 0
    y_hi = background.height - size - (travel if dy > 0 else 0)
    x0, y0 = int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1))
    rgb = jittered(rng, colour)
    frames = []
    first = Shape(kind, colour, Box(x0, y0, size), rgb)
    for i in range(VIDEO_FRAMES):
        frame = background.copy()
        draw_shape(frame, Shape(kind, colour, Box(x0 + dx * step * i, y0 + dy * step * i, size), rgb))
        frames.append(frame)
    return frames, first, direction, step


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


_IMAGE_TASKS = {
    "colour": _colour,
    "shape": _shape,
    "count": _count,
    "count_colour": _count_colour,
    "side": _side,
    "read": _read,
}


@dataclass(frozen=True)
class Drawn:
    """An item before its media is encoded: what training consumes (images need no PNG round trip;
    a video's frames are decoded back from its file, so training sees the codec's output)."""

    prompt: str
    answer: str
    scene: Scene
    image: Image.Image | None = None
    video: bytes | None = None


def draw(seed: int, task: str, index: int) -> Drawn:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rng = rng_for(seed, task, index)
    if task == "motion":
        frames, first, direction, step = motion_frames(rng)
        prompt = PROMPTS["motion"].format(colour=first.colour, shape=first.kind)
        scene = Scene((first,), direction=direction, step=step)
        return Drawn(prompt, direction, scene, video=clips.encode_mp4(frames))
    prompt, answer, image, scene = _IMAGE_TASKS[task](rng)
    return Drawn(prompt, answer, scene, image=image)


def item(seed: int, task: str, index: int) -> Item:
    d = draw(seed, task, index)
    if d.video is not None:
        return Item(task, index, d.prompt, d.answer, "video", d.video, d.scene)
    assert d.image is not None
    return Item(task, index, d.prompt, d.answer, "image", _png(d.image), d.scene)


def items(seed: int, tasks: list[str] | tuple[str, ...], n: int) -> list[Item]:
    """`n` items of each task, task by task, in a fixed order."""
    return [item(seed, task, i) for task in tasks for i in range(n)]
