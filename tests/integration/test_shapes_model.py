"""The shipped `epd-shapes` on held-out items in process: the tasks it has learned (colour, shape,
side, motion) meet their targets, the counts are well above chance, and the directory carries the
record of how it was trained (docs/evals.md has the table)."""

from __future__ import annotations

import json

import pytest

from serving.config import default_model
from serving.evals.inprocess import evaluate_in_process
from serving.evals.tasks import TASKS, items
from serving.training.recipe import TRAIN_SEED

# The targets; the shipped weights meet colour's, shape's, side's and motion's (docs/evals.md has every
# task's figure on 100 items).
TARGETS = {
    "colour": 0.97,
    "shape": 0.97,
    "side": 0.97,
    "count": 0.9,
    "count_colour": 0.9,
    "motion": 0.9,
    "read": 0.8,
}
SEED, N = 424242, 20


@pytest.fixture(scope="module")
def report():
    assert SEED != TRAIN_SEED
    return evaluate_in_process(str(default_model()), items(SEED, TASKS, N), SEED)


# Measured on these 20 items: colour 20, shape 19, side 20, motion 20. A model right 97 % of the time
# misses one of 20 about half the time, so 20 items allow one miss where the target is 97 % (two
# where it is 90 %): what can tell such a model from one that falls short is the 100-item table.
MISSES_ALLOWED = {"colour": 1, "shape": 1, "side": 1, "motion": 2}


@pytest.mark.parametrize("task", sorted(MISSES_ALLOWED))
def test_learned_tasks_meet_their_targets_on_held_out_items(report, task):
    (score,) = [s for s in report.scores() if s.task == task]
    assert score.n == N and score.errors == 0
    assert score.correct >= N - MISSES_ALLOWED[task]


# Measured on these 20 items: count 12, count_colour 14 (chance: 1 in 5, about 1 in 6); a margin of
# two items for another CPU's float rounding.
ABOVE_CHANCE = {"count": 0.5, "count_colour": 0.6}


@pytest.mark.parametrize("task", sorted(ABOVE_CHANCE))
def test_the_counts_are_well_above_chance(report, task):
    (score,) = [s for s in report.scores() if s.task == task]
    assert score.accuracy >= ABOVE_CHANCE[task]


def test_every_reply_is_an_answer_of_its_task(report):
    """Untrained tasks answer wrongly, but in the task's own vocabulary: the model learned the format."""
    vocab = {
        "colour": {"red", "green", "blue", "yellow"},
        "shape": {"circle", "square", "triangle"},
        "count": {str(k) for k in range(1, 6)},
        "count_colour": {str(k) for k in range(6)},
        "side": {"left", "right"},
        "motion": {"left", "right", "up", "down"},
    }
    for o in report.outcomes:
        if o.task == "read":
            assert o.answer.isdigit() and int(o.answer) <= 999, o.reply
        else:
            assert o.answer in vocab[o.task], (o.task, o.reply)


def test_answers_are_single_words_that_end():
    """Greedy replies are one answer word and the end of the turn, not a run-on."""
    r = evaluate_in_process(str(default_model()), items(SEED + 1, ["colour", "read"], 4), SEED + 1)
    assert all(len(o.reply.split()) == 1 for o in r.outcomes), [o.reply for o in r.outcomes]


def test_training_record_is_shipped():
    """The record says how the weights were made: recipe, steps, the wall time the history adds up to,
    and, for a readout stage started from an exported model, which weights it started from."""
    record = json.loads((default_model() / "training.json").read_text())
    assert record["recipe"]["data_seed"] == TRAIN_SEED and 0 < record["steps"] <= record["recipe"]["steps"]
    assert record["history"] and set(record["history"][-1]["check"]) == set(TASKS)
    assert record["wall_minutes"] == round(record["history"][-1]["minutes"], 1)
    notes = [row for row in record["history"] if "note" in row]
    if "init" in record:
        assert any(record["init"]["sha256"][:12] in row["note"] for row in notes)
