"""Stop rules, streaming text with stop strings held back, and the sampler's guarantees."""

from __future__ import annotations

import pytest
import torch

from serving.engine.sampler import sample
from serving.engine.sequence import Sequence
from serving.types import FinishReason, SamplingParams

EOS = 1000  # outside the ids the tests spell text with


class CharDetokenizer:
    """Token i decodes to chr(i): lets a test spell text with token ids."""

    def step(self, token_id: int) -> str:
        return chr(token_id)


def seq(params: SamplingParams, prompt: list[int] | None = None, max_model_len: int = 1000) -> Sequence:
    return Sequence("r", prompt or [1, 2, 3], params, CharDetokenizer(), (EOS,), max_model_len)


def feed(s: Sequence, text: str) -> list[str]:
    return [s.append(ord(c)).text for c in text if not s.finish_reason]


def test_max_tokens_finishes_with_length():
    s = seq(SamplingParams(max_tokens=3))
    assert feed(s, "abcdef") == ["a", "b", "c"]
    assert s.finish_reason == FinishReason.LENGTH


def test_eos_stops_unless_ignored_or_below_min_tokens():
    s = seq(SamplingParams(max_tokens=10))
    s.append(ord("a"))
    assert s.append(EOS).finish_reason == FinishReason.STOP and s.text == "a"
    s = seq(SamplingParams(max_tokens=4, ignore_eos=True))
    for _ in range(3):
        assert s.append(EOS).finish_reason is None
    s = seq(SamplingParams(max_tokens=4, min_tokens=2))
    assert s.append(EOS).finish_reason is None
    assert s.suppressed_token_ids == (EOS,)
    assert s.append(EOS).finish_reason == FinishReason.STOP


def test_stop_token_ids():
    s = seq(SamplingParams(max_tokens=10, stop_token_ids=(ord("x"),)))
    feed(s, "abxcd")
    assert s.text == "ab" and s.finish_reason == FinishReason.STOP


def test_stop_string_cut_and_held_back_while_streaming():
    s = seq(SamplingParams(max_tokens=50, stop=("END",)))
    chunks = feed(s, "hello ENxEND tail")
    # "EN" is held until "x" proves it is not a stop; the final stop string is never streamed.
    assert "".join(chunks) == "hello ENx"
    assert chunks[6:8] == ["", ""] and chunks[8] == "ENx"
    assert s.finish_reason == FinishReason.STOP and s.text == "hello ENx"


def test_held_text_flushed_when_length_ends_the_request():
    s = seq(SamplingParams(max_tokens=3, stop=("xyz",)))
    assert "".join(feed(s, "axy")) == "axy"
    assert s.finish_reason == FinishReason.LENGTH


def test_max_model_len_ends_with_length():
    s = seq(SamplingParams(max_tokens=50), prompt=[1] * 8, max_model_len=10)
    feed(s, "abcdef")
    assert s.text == "ab" and s.finish_reason == FinishReason.LENGTH


def test_invalid_params_rejected():
    for bad in (
        dict(max_tokens=0),
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-1),
        dict(min_tokens=5, max_tokens=2),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def logits_for(batch: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_top_k_one_is_greedy():
    logits = logits_for(3)
    seqs = [
        seq(SamplingParams()),
        seq(SamplingParams(temperature=1.0, top_k=1, seed=1)),
        seq(SamplingParams()),
    ]
    tokens, _ = sample(logits.clone(), seqs)
    assert tokens == logits.argmax(-1).tolist()


def test_seeded_sampling_reproducible_and_independent_of_batch():
    logits = logits_for(4)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits[i : i + 1].clone(), [seq(params)])[0][0] for i in range(4)]
    together, _ = sample(logits.clone(), [seq(params) for _ in range(4)])
    assert together == alone
    draws = {
        sample(logits[:1].clone(), [seq(SamplingParams(temperature=1.0, seed=s))])[0][0] for s in range(40)
    }
    assert len(draws) > 1, "different seeds should not all draw the same token"


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]])
    drawn = {
        sample(logits.clone(), [seq(SamplingParams(temperature=1.0, top_p=0.5, seed=s))])[0][0]
        for s in range(30)
    }
    assert drawn == {0}
    drawn = {
        sample(logits.clone(), [seq(SamplingParams(temperature=1.0, top_p=0.99, seed=s))])[0][0]
        for s in range(60)
    }
    assert drawn == {0, 1}


def test_logprobs_returned_when_asked():
    logits = logits_for(2)
    tokens, logprobs = sample(logits.clone(), [seq(SamplingParams(logprobs=3)), seq(SamplingParams())])
    assert logprobs[1] is None
    assert tokens[0] in logprobs[0] and len(logprobs[0]) == 3  # the sampled token is the top-1 under greedy
    assert logprobs[0][tokens[0]] == pytest.approx(float(logits[0].log_softmax(-1).max()))
