"""Scoring rules, Wilson intervals, request bodies and `--extra` merging, and the report's fields."""

from __future__ import annotations

import pytest

from serving.evals.report import Outcome, Report
from serving.evals.requests import chat_body, merge
from serving.evals.score import answer_of, wilson
from serving.evals.tasks import item


@pytest.mark.parametrize(
    ("reply", "answer"),
    [
        ("Red", "red"),
        ("  blue.", "blue"),
        ("left, I think", "left"),
        ('"417"', "417"),
        ("\nsquare!\n", "square"),
        ("", ""),
        ("Triangle—", "triangle"),
    ],
)
def test_answer_is_the_first_word_lowered_and_stripped(reply, answer):
    assert answer_of(reply) == answer


def test_wilson_matches_known_values():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    lo, hi = wilson(81, 100)
    assert lo == pytest.approx(0.7222, abs=1e-3) and hi == pytest.approx(0.8749, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_extra_merges_nested_objects_without_touching_the_base():
    base = {"model": "m", "mm_processor_kwargs": {"max_pixels": 1}, "max_tokens": 8}
    merged = merge(base, {"mm_processor_kwargs": {"min_pixels": 2}, "max_tokens": 4, "top_k": 1})
    assert merged == {
        "model": "m",
        "mm_processor_kwargs": {"max_pixels": 1, "min_pixels": 2},
        "max_tokens": 4,
        "top_k": 1,
    }
    assert base["mm_processor_kwargs"] == {"max_pixels": 1} and base["max_tokens"] == 8


def test_chat_body_is_one_user_message_media_first_greedy_eight_tokens():
    image, video = item(1, "colour", 0), item(1, "motion", 0)
    body = chat_body(image, "epd-shapes", {"seed": 3})
    assert body["temperature"] == 0 and body["max_tokens"] == 8 and body["seed"] == 3
    (message,) = body["messages"]
    assert message["role"] == "user"
    media, text = message["content"]
    assert media["type"] == "image_url" and media["image_url"]["url"].startswith("data:image/png;base64,")
    assert text == {"type": "text", "text": image.prompt}
    media = chat_body(video, "m")["messages"][0]["content"][0]
    assert media["type"] == "video_url" and media["video_url"]["url"].startswith("data:video/mp4;base64,")


def test_report_scores_errors_as_wrong_and_keeps_every_item():
    outcomes = [
        Outcome("colour", 0, "red", "Red.", 80),
        Outcome("colour", 1, "blue", "green", 80),
        Outcome("colour", 2, "red", error="http 503: busy"),
        Outcome("read", 0, "417", "417", 70),
    ]
    report = Report("m", 9, "http://x/v1", outcomes, 2.0)
    colour, read = report.scores()
    assert (colour.task, colour.n, colour.correct, colour.errors) == ("colour", 3, 1, 1)
    assert colour.mean_prompt_tokens == 80 and colour.interval == wilson(1, 3)
    assert (read.n, read.correct, read.accuracy) == (1, 1, 1.0)
    data = report.to_json()
    assert data["overall"]["correct"] == 2 and data["items_per_second"] == 2.0
    assert [i["correct"] for i in data["items"]] == [True, False, False, True]
    assert "colour" in report.table() and "items/s" in report.table()
