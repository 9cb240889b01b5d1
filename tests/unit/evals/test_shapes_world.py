"""The shapes-world generator: the same seed draws the same bytes, every drawing keeps the published
rules, and every answer is right by construction, re-derived here from the drawn pixels alone."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from serving.evals.drawing import COLOURS, GAP, JITTER, MAX_SIZE, MIN_SIZE, SIDES, VIDEO_SIDES
from serving.evals.prompts import PROMPTS
from serving.evals.tasks import TASKS, item, items

N = 24  # items per task re-derived here
SEED = 5


def colour_masks(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels within the jitter of each colour (plus one for codec-free rounding). The background, white
    or noise in [215, 255], is far from all four."""
    p = pixels.astype(int)
    return {name: (np.abs(p - np.array(rgb)) <= JITTER + 1).all(axis=-1) for name, rgb in COLOURS.items()}


def blobs(pixels: np.ndarray) -> list[tuple[str, tuple[float, float], float]]:
    """(colour, centre (x, y), fill ratio of its bounding box) of each connected shape."""
    out = []
    for name, mask in colour_masks(pixels).items():
        labels, count = ndimage.label(mask)
        for k in range(1, count + 1):
            ys, xs = np.nonzero(labels == k)
            box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
            out.append((name, (float(xs.mean()), float(ys.mean())), len(xs) / box))
    return out


def kind_of(fill: float) -> str:
    """A filled square covers its box, a circle about pi/4 of it, an upward triangle about half."""
    return "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_bytes(task):
    a, b = item(SEED, task, 3), item(SEED, task, 3)
    assert a.media == b.media and a.prompt == b.prompt and a.answer == b.answer
    assert item(SEED + 1, task, 3).media != a.media
    assert item(SEED, task, 4).media != a.media


def test_items_are_task_by_task_in_order():
    got = items(SEED, ["colour", "read"], 3)
    assert [(i.task, i.index) for i in got] == [("colour", k) for k in range(3)] + [
        ("read", k) for k in range(3)
    ]


@pytest.mark.parametrize("task", ["colour", "shape", "count", "count_colour", "side"])
def test_shape_answers_rederived_from_pixels(task):
    for i in range(N):
        it = item(SEED, task, i)
        pixels = np.asarray(it.image())
        assert pixels.shape[1] in SIDES and pixels.shape[0] in SIDES
        found = blobs(pixels)
        assert len(found) == len(it.scene.shapes)
        if task == "colour":
            assert it.answer == found[0][0]
        elif task == "shape":
            assert it.answer == kind_of(found[0][2])
            assert it.prompt == PROMPTS["shape"].format(colour=found[0][0])
        elif task == "count":
            assert it.answer == str(len(found))
        elif task == "count_colour":
            asked = re.match(r"How many (\w+) shapes", it.prompt).group(1)
            assert it.answer == str(sum(c == asked for c, _, _ in found))
        else:
            colour, kind = re.match(r"Is the (\w+) (\w+) on", it.prompt).groups()
            (mine,) = [b for b in found if b[0] == colour]
            (other,) = [b for b in found if b[0] != colour]
            assert kind_of(mine[2]) == kind
            assert it.answer == ("left" if mine[1][0] < other[1][0] else "right")
            assert abs(mine[1][0] - other[1][0]) >= pixels.shape[1] / 4 - 2


@pytest.mark.parametrize("task", ["count", "count_colour"])
def test_boxes_keep_the_rules(task):
    for i in range(N):
        it = item(SEED, task, i)
        width, height = it.image().size
        boxes = [s.box for s in it.scene.shapes]
        for b in boxes:
            assert MIN_SIZE <= b.size <= MAX_SIZE
            assert b.x >= 0 and b.x + b.size <= width and b.y >= 0 and b.y + b.size <= height
        for a in range(len(boxes)):
            for c in range(a + 1, len(boxes)):
                assert boxes[a].apart(boxes[c], GAP)


def test_count_colour_answers_cover_zero_to_five():
    answers = {item(SEED, "count_colour", i).answer for i in range(120)}
    assert answers == {str(k) for k in range(6)}


def test_read_draws_the_whole_number():
    """Every digit is drawn and none is clipped: the ink equals the same text drawn alone with room
    around it, and there is one glyph per digit."""
    for i in range(N):
        it = item(SEED, "read", i)
        dark = np.asarray(it.image()).astype(int).max(axis=-1) < 128
        font = ImageFont.load_default(size=it.scene.font_size)
        alone = Image.new("L", (400, 200), 255)
        ImageDraw.Draw(alone).text((50, 50), it.answer, font=font, fill=0)
        assert abs(int(dark.sum()) - int((np.asarray(alone) < 128).sum())) <= 0.05 * dark.sum()
        _, glyphs = ndimage.label(dark)
        assert glyphs == len(it.answer)
        assert it.answer == str(it.scene.number) and 0 <= int(it.answer) <= 999
        assert 40 <= it.scene.font_size <= 72


def test_motion_direction_rederived_from_decoded_frames():
    for i in range(12):
        it = item(SEED, "motion", i)
        frames = [np.asarray(f) for f in it.frames()]
        assert len(frames) == 8
        height, width = frames[0].shape[:2]
        assert width in VIDEO_SIDES and height in VIDEO_SIDES
        colour = it.scene.shapes[0].colour
        centres = []
        for f in frames:
            # The codec blurs edges and shifts colours a little: take the pixels nearest the colour.
            distance = np.abs(f.astype(int) - np.array(COLOURS[colour])).sum(axis=-1)
            ys, xs = np.nonzero(distance < 90)
            assert len(xs) > 200
            centres.append((xs.mean(), ys.mean()))
        dx, dy = centres[-1][0] - centres[0][0], centres[-1][1] - centres[0][1]
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert moved == it.answer
        assert max(abs(dx), abs(dy)) >= 7 * 8 - 4
        assert it.prompt == PROMPTS["motion"].format(colour=colour, shape=it.scene.shapes[0].kind)
