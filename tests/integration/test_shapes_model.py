"""The shipped `epd-shapes` meets its accuracy targets in process on held-out items, and the directory
carries the record of how it was trained."""

from __future__ import annotations

import json

import pytest

from serving.config import default_model
from serving.evals.inprocess import evaluate_in_process
from serving.evals.tasks import TASKS, items
from serving.training.recipe import TRAIN_SEED

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


@pytest.mark.parametrize("task", TASKS)
def test_meets_target_on_held_out_items(report, task):
    (score,) = [s for s in report.scores() if s.task == task]
    assert score.n == N and score.errors == 0
    assert score.accuracy >= TARGETS[task], (
        task,
        score.correct,
        [o.reply for o in report.outcomes if o.task == task and not o.correct],
    )


def test_answers_are_single_words_that_end():
    """Greedy replies are one answer word and the end of the turn, not a run-on."""
    r = evaluate_in_process(str(default_model()), items(SEED + 1, ["colour", "read"], 4), SEED + 1)
    assert all(len(o.reply.split()) == 1 for o in r.outcomes), [o.reply for o in r.outcomes]


def test_training_record_is_shipped():
    record = json.loads((default_model() / "training.json").read_text())
    assert record["recipe"]["data_seed"] == TRAIN_SEED and record["steps"] == record["recipe"]["steps"]
    assert 0 < record["wall_minutes"] <= 90
    assert record["history"] and set(record["history"][-1]["check"]) == set(TASKS)
