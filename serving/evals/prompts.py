"""The shapes-world tasks' exact prompts and their answer vocabularies (docs/evals.md)."""

from __future__ import annotations

import itertools

COLOUR_NAMES = ("red", "green", "blue", "yellow")
SHAPE_NAMES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")

PROMPTS = {
    "colour": "What colour is the {shape}?",
    "shape": "What shape is the {colour} object?",
    "count": "How many shapes are there?",
    "count_colour": "How many {colour} shapes are there?",
    "side": "Is the {colour} {shape} on the left or the right?",
    "read": "What number is written in the image?",
    "motion": "Which way does the {colour} {shape} move?",
}


def all_prompts() -> list[str]:
    """Every prompt the tasks can ask and every answer they expect, for the tokenizer's corpus."""
    out = []
    for template in PROMPTS.values():
        for colour, shape in itertools.product(COLOUR_NAMES, SHAPE_NAMES):
            out.append(template.format(colour=colour, shape=shape))
    return sorted(set(out)) + answer_words() + [str(n) for n in range(1000)]


def answer_words() -> list[str]:
    """The tasks' word answers (numbers are read out digit by digit)."""
    return [*COLOUR_NAMES, *SHAPE_NAMES, *DIRECTIONS]
