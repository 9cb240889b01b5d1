"""Stop strings, before and after incremental matching, measured in one run at the engine level: one
request of 3,000 tokens (ignore_eos, greedy) on the tiny model, with no stop strings, with 16 stop
strings at the new maximum (1,024 characters), and with 16 of 50,000 characters (the issue's case, now
refused at the edge but still timed here). "before" swaps in the previous matcher, which rescanned a
window of the longest stop string and every prefix of every stop string on each token.

    .venv/bin/python -m benchmarks.stop_strings [--tokens 3000] [--skip-old-50k]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from serving.config import EngineConfig, default_model_dir
from serving.engine.llm import LLMEngine
from serving.engine.models.builder import ensure_model
from serving.engine.sequence import Sequence
from serving.types import FinishReason, SamplingParams


def _old_match_stop_strings(self: Sequence, text: str, piece: str = "") -> tuple[str, FinishReason | None]:
    """The matcher this replaced, verbatim: a window of the longest stop string before the new text,
    every stop string searched in it, and every prefix of every stop string tried for the hold."""
    window = self.text[-max(len(s) for s in self.params.stop) :] + text
    base = len(window) - len(text)
    hits = [i for s in self.params.stop if (i := window.find(s)) != -1]
    if hits and len(self.output_token_ids) >= self.params.min_tokens:
        return text[: max(0, min(hits) - base)], FinishReason.STOP
    hold = 0
    for s in self.params.stop:
        for n in range(min(len(s) - 1, len(window)), 0, -1):
            if window.endswith(s[:n]):
                hold = max(hold, n)
                break
    hold = min(hold, len(text))
    if hold:
        self._held = text[len(text) - hold :]
        text = text[: len(text) - hold]
    return text, None


MATCH_CPU = [0.0]  # CPU seconds spent matching stop strings, whichever matcher is installed


def _timed(
    match: Callable[..., tuple[str, FinishReason | None]],
) -> Callable[..., tuple[str, FinishReason | None]]:
    def timed(self: Sequence, text: str, piece: str = "") -> tuple[str, FinishReason | None]:
        start = time.thread_time()  # CPU time of this thread: other processes on the machine do not count
        try:
            return match(self, text, piece)
        finally:
            MATCH_CPU[0] += time.thread_time() - start

    return timed


@contextmanager
def matcher(old: bool) -> Iterator[None]:
    """Install the previous (old=True) or the current matcher, timed."""
    current = Sequence._match_stop_strings
    Sequence._match_stop_strings = _timed(_old_match_stop_strings if old else current)  # type: ignore[method-assign]
    try:
        yield
    finally:
        Sequence._match_stop_strings = current  # type: ignore[method-assign]


def stop_strings(count: int, length: int) -> tuple[str, ...]:
    """Strings the tiny model's output never contains (control characters), so nothing stops early."""
    rng = random.Random(length)
    return tuple("".join(chr(rng.randint(1, 8)) for _ in range(length)) for _ in range(count))


def run(engine: LLMEngine, tokens: int, stops: tuple[str, ...], old: bool) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds matching stop strings, text) of one request."""
    prompt = engine.inputs.from_user_prompt("Tell me a very long story.", [])
    params = SamplingParams(max_tokens=tokens, ignore_eos=True, stop=stops)
    MATCH_CPU[0] = 0.0
    with matcher(old):
        start = time.perf_counter()
        result = engine.generate([(prompt, params)])[0]
        elapsed = time.perf_counter() - start
    assert len(result.token_ids) == tokens and result.finish_reason == FinishReason.LENGTH
    return elapsed, MATCH_CPU[0], result.text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument(
        "--old-50k-tokens", type=int, default=600,
        help="tokens to run the previous matcher for with 50,000-character stop strings (its work per "
        "token grows with the output, so the full length takes far too long)",
    )  # fmt: skip
    args = parser.parse_args()
    model = ensure_model(default_model_dir("tiny"), "tiny")
    engine = LLMEngine(EngineConfig(model=str(model), max_model_len=args.tokens + 64, num_kv_blocks=512))
    run(engine, 16, (), old=False)  # warm-up
    print("one request, greedy, ignore_eos, tiny model on CPU. wall: the request; match: CPU seconds spent")
    print("matching stop strings (thread CPU time, so other load on the machine does not count)")
    print(f"{'stop strings':<20}{'tokens':>7}{'before wall':>13}{'match':>9}{'after wall':>13}{'match':>9}")
    long_stops = stop_strings(16, 50_000)
    cases = [
        ("none", (), args.tokens),
        ("16 x 1,024 chars", stop_strings(16, 1024), args.tokens),
        ("16 x 50,000 chars", long_stops, args.old_50k_tokens),
        ("16 x 50,000 chars", long_stops, args.tokens),
    ]
    for name, stops, tokens in cases:
        after, after_cpu, text_after = run(engine, tokens, stops, old=False)
        if len(stops) and len(stops[0]) > 1024 and tokens > args.old_50k_tokens:
            print(f"{name:<20}{tokens:>7}{'(too slow)':>13}{'':>9}{after:>13.2f}{after_cpu:>9.3f}")
            continue
        before, before_cpu, text_before = run(engine, tokens, stops, old=True)
        assert text_before == text_after  # the same output either way
        print(f"{name:<20}{tokens:>7}{before:>13.2f}{before_cpu:>9.3f}{after:>13.2f}{after_cpu:>9.3f}")
    print("the gateway now refuses stop strings over 1,024 characters or more than 16 of them (400)")


if __name__ == "__main__":
    main()
