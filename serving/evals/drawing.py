"""Drawing the shapes world: canvases, filled shapes and numbers, placed without overlap.

Every random choice comes from the generator passed in, in a fixed order, so the same seed draws the
same pixels. The constants here are the task's published contract (docs/evals.md): other tools draw
items from the same rules independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from serving.evals.prompts import COLOUR_NAMES

SIDES = tuple(range(224, 449, 28))  # canvas width and height for images
VIDEO_SIDES = (224, 252, 280, 308, 336)
COLOURS: dict[str, tuple[int, int, int]] = dict(
    zip(COLOUR_NAMES, ((220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 40)), strict=True)
)
JITTER = 15  # each channel of a shape's colour moves by up to this much
MIN_SIZE, MAX_SIZE = 36, 84  # side of a shape's (square) bounding box, pixels
GAP = 6  # at least this many pixels between two bounding boxes
NOISE_LOW = 215  # a noisy background is per-pixel uniform in [NOISE_LOW, 255]
FONT_SIZES = (40, 72)
MAX_TRIES = 1000


@dataclass(frozen=True)
class Box:
    """A shape's square bounding box: the left and top pixel and the side."""

    x: int
    y: int
    size: int

    @property
    def centre(self) -> tuple[float, float]:
        return (self.x + self.size / 2, self.y + self.size / 2)

    def apart(self, other: Box, gap: int = GAP) -> bool:
        """At least `gap` pixels between the two boxes along one axis."""
        return (
            self.x + self.size + gap <= other.x
            or other.x + other.size + gap <= self.x
            or self.y + self.size + gap <= other.y
            or other.y + other.size + gap <= self.y
        )


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: Box
    rgb: tuple[int, int, int]


def canvas(
    rng: np.random.Generator, sides: tuple[int, ...] = SIDES, noise: bool | None = None
) -> Image.Image:
    """A white canvas, or (half the time when `noise` is None) one of per-pixel uniform noise."""
    width, height = int(rng.choice(sides)), int(rng.choice(sides))
    if noise is None:
        noise = bool(rng.integers(2))
    if not noise:
        return Image.new("RGB", (width, height), (255, 255, 255))
    pixels = rng.integers(NOISE_LOW, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def jittered(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = COLOURS[colour]
    delta = rng.integers(-JITTER, JITTER + 1, size=3)
    return tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(base, delta, strict=True))  # type: ignore[return-value]


def place(rng: np.random.Generator, width: int, height: int, taken: list[Box], size: int) -> Box | None:
    """A box of this side fully inside the canvas and apart from every box already taken, or None when
    random tries find no room."""
    for _ in range(MAX_TRIES):
        box = Box(int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1)), size)
        if all(box.apart(other) for other in taken):
            return box
    return None


def draw_shape(image: Image.Image, shape: Shape) -> None:
    draw = ImageDraw.Draw(image)
    b = shape.box
    right, bottom = b.x + b.size - 1, b.y + b.size - 1
    if shape.kind == "circle":
        draw.ellipse((b.x, b.y, right, bottom), fill=shape.rgb)
    elif shape.kind == "square":
        draw.rectangle((b.x, b.y, right, bottom), fill=shape.rgb)
    else:  # isosceles, pointing up: apex at the top middle, base along the bottom
        draw.polygon(((b.x + (b.size - 1) / 2, b.y), (b.x, bottom), (right, bottom)), fill=shape.rgb)


def layout(rng: np.random.Generator, width: int, height: int, specs: list[tuple[str, str]]) -> list[Shape]:
    """Shapes of the given (kind, colour), each of a random size and jittered colour, placed apart. A
    layout that leaves no room for its last shapes is drawn again from the start."""
    for _ in range(MAX_TRIES):
        taken: list[Box] = []
        shapes: list[Shape] = []
        for kind, colour in specs:
            size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            box = place(rng, width, height, taken, size)
            if box is None:
                break
            taken.append(box)
            shapes.append(Shape(kind, colour, box, jittered(rng, colour)))
        else:
            return shapes
    raise RuntimeError("no room for the shapes")  # pragma: no cover - five fit easily on 224²


def draw_number(rng: np.random.Generator, image: Image.Image, number: int) -> tuple[int, int]:
    """The number in black, Pillow's built-in font at a random size, its text box fully inside the
    canvas; returns the font size and the text's origin."""
    size = int(rng.integers(FONT_SIZES[0], FONT_SIZES[1] + 1))
    font = ImageFont.load_default(size=size)
    text = str(number)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(-left, image.width - right + 1))
    y = int(rng.integers(-top, image.height - bottom + 1))
    draw.text((x, y), text, font=font, fill=(0, 0, 0))
    return size, (x, y)
