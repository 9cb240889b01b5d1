"""Stop strings matched incrementally: the same output as a naive reference that rescans everything
(stop strings spanning tokens, held-back text, min_tokens), and work per token bounded by the stop
strings, not by the length of the output."""

from __future__ import annotations

import random

import pytest

from serving.engine.sequence import Sequence
from serving.engine.stop import StopMatcher
from serving.types import FinishReason, SamplingParams

EOS = 100_000


class PieceDetokenizer:
    """Token i decodes to pieces[i]: a token may carry several characters, or none."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def step(self, token_id: int) -> str:
        return self.pieces[token_id]


def reference(pieces: list[str], stops: tuple[str, ...], max_tokens: int, min_tokens: int = 0):
    """What the stream shows per token and how it ends, by rescanning the whole text each token: a stop
    counts once it ends inside the newest piece (at or after min_tokens), the earliest end first and the
    longest stop at that end; the longest tail that begins a stop is held back."""
    text, shown, chunks = "", "", []
    for step, piece in enumerate(pieces[:max_tokens], start=1):
        before = len(text)
        text += piece
        if step >= min_tokens:
            ends = [
                (end, len(s))
                for s in stops
                for end in range(max(before + 1, len(s)), len(text) + 1)
                if text[end - len(s) : end] == s
            ]
            if ends:
                end, length = min(ends, key=lambda e: (e[0], -e[1]))
                final = text[: end - length]
                chunks.append(final[len(shown) :])
                return chunks, final, FinishReason.STOP
        if step == max_tokens:
            chunks.append(text[len(shown) :])
            return chunks, text, FinishReason.LENGTH
        hold = max(
            (n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
            default=0,
        )
        visible = text[: len(text) - hold]
        chunks.append(visible[len(shown) :])
        shown = visible
    return chunks, shown, None


def run(pieces: list[str], stops: tuple[str, ...], max_tokens: int, min_tokens: int = 0):
    params = SamplingParams(max_tokens=max_tokens, stop=stops, min_tokens=min_tokens, ignore_eos=True)
    seq = Sequence("r", [1], params, PieceDetokenizer(pieces), (EOS,), 10**6)
    chunks = []
    for token_id in range(len(pieces)):
        chunks.append(seq.append(token_id).text)
        if seq.finish_reason:
            break
    return chunks, seq.text, seq.finish_reason


def test_matches_the_naive_reference_on_random_cases():
    rng = random.Random(7)
    alphabet = "ab c"
    for case in range(3000):
        stops = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))
        )
        pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(30)]
        max_tokens = rng.randint(1, 30)
        min_tokens = rng.choice([0, 0, rng.randint(0, max_tokens)])
        got = run(pieces, stops, max_tokens, min_tokens)
        want = reference(pieces, stops, max_tokens, min_tokens)
        assert got == want, (case, stops, pieces[:max_tokens], min_tokens)
        assert "".join(got[0]) == got[1]  # the stream adds up to the final text


@pytest.mark.parametrize(
    ("pieces", "stops", "text"),
    [
        (["hello", " EN", "D tail"], ("END",), "hello "),  # spans two tokens
        (["x<", "|", "st", "op|>y"], ("<|stop|>",), "x"),  # spans four tokens
        (["abc", "d"], ("abcd", "bc"), "a"),  # "bc" is completed first, inside the first token
        (["ab", "cd"], ("abcd", "bc"), "a"),
        (["aab"], ("ab", "aab"), ""),  # same end: the longer one
    ],
)
def test_cut_points(pieces, stops, text):
    assert run(pieces, stops, 10)[1:] == (text, FinishReason.STOP)


def test_work_per_token_is_bounded_by_the_stop_strings_not_the_output():
    """Sixteen 1,024-character stop strings the output keeps almost matching (the worst case for a
    rescan): the matcher's steps per character stay under a constant, however long the output."""
    length, count = 1024, 16
    stops = tuple("a" * (length - 1) + chr(ord("b") + i) for i in range(count))
    rng = random.Random(1)
    per_char = []
    for tokens in (300, 3000):
        matcher = StopMatcher(stops)
        chars = 0
        worst = 0
        for _ in range(tokens):
            piece = "a" * rng.randint(1, 4)
            before = matcher.ops
            assert matcher.feed(piece) is None
            worst = max(worst, matcher.ops - before)
            chars += len(piece)
        assert matcher.partial == min(chars, length - 1)  # all but the last character may be held
        # KMP: each character costs one step per stop plus fall-backs that undo earlier advances.
        assert matcher.ops <= 2 * count * chars
        assert worst <= count * (4 + length)
        per_char.append(matcher.ops / chars)
    assert max(per_char) <= 2 * count  # ten times the output, the same bound per character


def test_sequence_scans_only_the_new_text():
    """Through Sequence: the steps per token do not grow as the output grows."""
    stops = tuple("z" * 1000 + str(i) for i in range(16))
    pieces = ["zz"] * 3000
    params = SamplingParams(max_tokens=3000, stop=stops, ignore_eos=True)
    seq = Sequence("r", [1], params, PieceDetokenizer(pieces), (EOS,), 10**6)
    ops = []
    for token_id in range(len(pieces)):
        before = seq._stops.ops if seq._stops else 0
        seq.append(token_id)
        ops.append(seq._stops.ops - before)
    assert seq.finish_reason == FinishReason.LENGTH and seq.text == "zz" * 3000
    # Once the output is longer than the stop strings, each token costs the same, to the end.
    early, late = sum(ops[1000:1100]), sum(ops[2900:3000])
    assert late <= early * 1.05 and max(ops) <= 16 * (2 + 1001)
