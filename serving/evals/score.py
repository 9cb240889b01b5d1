"""Scoring: the answer word of a reply, and Wilson score intervals for accuracies."""

from __future__ import annotations

import math
import unicodedata


def _punctuation(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def answer_of(reply: str) -> str:
    """The first whitespace-separated word, lower-cased, with punctuation (any Unicode punctuation,
    quotes and dashes included) stripped from its ends."""
    words = reply.split()
    if not words:
        return ""
    word = words[0]
    start, end = 0, len(word)
    while start < end and _punctuation(word[start]):
        start += 1
    while end > start and _punctuation(word[end - 1]):
        end -= 1
    return word[start:end].lower()


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % by default): sound at 0 and n correct, unlike the normal one."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
