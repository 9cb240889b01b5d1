"""`epd model train`'s recipe: the default one, or a file's (a recipe or a training.json), with the
flags given over it and the ones not given leaving it alone."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from serving.cli import build_parser
from serving.training.cli import recipe_from_args
from serving.training.recipe import Recipe


def parse(*argv: str) -> Recipe:
    return recipe_from_args(build_parser().parse_args(["model", "train", "--out", "x", *argv]))


def test_no_recipe_file_is_the_default_recipe_with_the_flags_over_it():
    assert parse() == Recipe()
    assert parse("--steps", "40", "--threads", "1") == replace(Recipe(), steps=40, threads=1)


def test_a_training_record_reruns_its_recipe(tmp_path):
    shipped = replace(Recipe(), readout_from=6000, steps=7500, look_weight=1.0, relay_head=1)
    record = tmp_path / "training.json"
    record.write_text(json.dumps({"recipe": asdict(shipped), "steps": 7500, "history": []}))
    assert parse("--recipe", str(record)) == shipped
    # A flag set to the default recipe's value still applies over the file's.
    assert parse("--recipe", str(record), "--steps", str(Recipe.steps)).steps == Recipe.steps
    plain = tmp_path / "recipe.json"
    plain.write_text(json.dumps({"steps": 12, "count_weight": 0.5}))
    assert parse("--recipe", str(plain)) == replace(Recipe(), steps=12, count_weight=0.5)


def test_a_file_that_is_not_a_recipe_is_one_line_not_a_traceback(tmp_path):
    cases = {
        "unknown.json": (json.dumps({"steps": 12, "stepz": 3}), "not recipe fields: stepz"),
        "list.json": ("[1, 2]", "expected a JSON object"),
        "broken.json": ("{", "--recipe"),
    }
    for name, (text, says) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SystemExit) as stopped:
            parse("--recipe", str(tmp_path / name))
        assert says in str(stopped.value) and "\n" not in str(stopped.value)
    with pytest.raises(SystemExit, match="No such file"):
        parse("--recipe", str(tmp_path / "missing.json"))
