"""Sampling parameters normalised at the edge, and a sampler no request can make raise: tiny
temperatures, top_k far beyond the vocabulary, logits with NaN or infinities, out-of-range stop ids."""

from __future__ import annotations

import math

import pytest
import torch

from serving.engine.sampler import LOGPROB_FLOOR, sample
from serving.engine.sequence import Sequence
from serving.types import GREEDY_EPSILON, SamplingParams


class CharDetokenizer:
    def step(self, token_id: int) -> str:
        return chr(token_id)


def seq(params: SamplingParams) -> Sequence:
    return Sequence("r", [1, 2, 3], params, CharDetokenizer(), (1000,), 1000)


@pytest.mark.parametrize("temperature", [0.0, 1e-300, 5e-324, 1e-6, GREEDY_EPSILON / 2])
def test_temperatures_below_epsilon_are_greedy(temperature):
    params = SamplingParams(temperature=temperature)
    assert params.greedy and params.temperature == 0.0


def test_temperatures_at_or_above_epsilon_are_kept():
    for temperature in (GREEDY_EPSILON, 0.5, 2.0):
        params = SamplingParams(temperature=temperature)
        assert not params.greedy and params.temperature == temperature


@pytest.mark.parametrize("bad", [dict(temperature=math.nan), dict(temperature=-1e-300), dict(top_p=math.nan)])
def test_nan_and_negative_parameters_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def _unnormalised(temperature: float, **kw) -> SamplingParams:
    """Params that skipped the edge (built by hand): the sampler must still cope."""
    params = SamplingParams(temperature=1.0, **kw)
    object.__setattr__(params, "temperature", temperature)
    return params


def test_tiny_temperature_reaching_the_sampler_does_not_overflow():
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 50
    for temperature in (1e-300, 1e-30, 1e-8):
        tokens, _ = sample(logits.clone(), [seq(_unnormalised(temperature, seed=3)) for _ in range(2)])
        assert tokens == logits.argmax(-1).tolist()


def test_top_k_far_beyond_the_vocabulary_is_clamped():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.0, top_k=k, seed=5) for k in (2**31 - 1, 41, 10**18)]
    tokens, _ = sample(logits.clone(), [seq(p) for p in params])
    assert all(0 <= t < 40 for t in tokens)
    full, _ = sample(logits.clone(), [seq(SamplingParams(temperature=1.0, seed=5)) for _ in range(3)])
    assert tokens == full  # clamped to the vocabulary: the same as no top-k


def test_rows_with_nan_and_infinities_never_raise():
    vocab = 16
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2))
    logits[0] = float("nan")  # all NaN
    logits[1] = float("-inf")  # all -inf
    logits[2, 5] = float("inf")  # one +inf: it wins
    logits[3, ::2] = float("nan")  # half NaN
    logits[4, 7] = float("inf")
    logits[4, 9] = float("inf")  # two +inf
    logits[5] = 3.4e38  # huge but finite
    for params in (
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=2.0, top_k=3, top_p=0.5, seed=1),
        SamplingParams(temperature=1.0, logprobs=20, seed=1),
    ):
        tokens, logprobs = sample(logits.clone(), [seq(params) for _ in range(6)])
        assert all(0 <= t < vocab for t in tokens)
        assert tokens[2] == 5 and tokens[4] in (7, 9)
        assert not torch.isnan(logits[3, tokens[3]])  # a NaN entry is never chosen over a real one
        for entry in logprobs:
            if entry is not None:
                assert all(math.isfinite(v) and v >= LOGPROB_FLOOR for v in entry.values())
                assert len(entry) <= vocab


def test_out_of_range_stop_token_ids_are_ignored_while_suppressed():
    logits = torch.randn(1, 8)
    params = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(3, 10**9, -1))
    tokens, _ = sample(logits.clone(), [seq(params)])
    assert tokens[0] != 3 and 0 <= tokens[0] < 8
