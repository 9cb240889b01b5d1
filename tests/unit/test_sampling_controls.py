"""Penalties, logit bias and min-p, against straightforward reference implementations on fixed logits,
and through the engine: a -100 bias removes the token greedy decoding would emit, +100 forces one."""

from __future__ import annotations

import pytest
import torch

from serving.engine.inputs import Prompt
from serving.engine.sampler import _filtered_probs, _penalize, sample
from serving.types import SamplingParams

VOCAB = 50


def seq(engine, prompt: list[int], outputs: list[int], **params):
    s = engine.make_sequence("s", Prompt(prompt), SamplingParams(max_tokens=64, **params))
    s.output_token_ids = list(outputs)  # as if sampled: the penalties read only the tokens
    return s


def reference_penalties(logits, prompt, outputs, rep, freq, presence):
    out = logits.clone()
    for t in set(prompt) | set(outputs):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(outputs):
        out[t] -= freq * outputs.count(t) + presence
    return out


def test_penalties_equal_the_reference(engine):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, VOCAB, generator=gen) * 3
    cases = [
        ([1, 2, 3], [4, 4, 4, 5], dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25)),
        ([7, 7], [], dict(repetition_penalty=0.8)),
        ([9], [9, 10, 10], dict(frequency_penalty=-1.0, presence_penalty=2.0)),
    ]
    seqs = [seq(engine, p, o, **kw) for p, o, kw in cases]
    got = logits.clone()
    _penalize(got, seqs)
    for i, (p, o, kw) in enumerate(cases):
        want = reference_penalties(
            logits[i],
            p,
            o,
            kw.get("repetition_penalty", 1.0),
            kw.get("frequency_penalty", 0.0),
            kw.get("presence_penalty", 0.0),
        )
        assert torch.allclose(got[i], want, atol=1e-6)


def dense_penalties(logits, seqs):
    """The penalties over the whole vocabulary (counts of every token per row), as the sampler once
    computed them: the sparse form must give the same bits."""
    vocab = logits.shape[-1]

    def counts(tokens):
        return torch.bincount(
            torch.tensor([t for t in tokens if t < vocab], dtype=torch.long), minlength=vocab
        )

    out = logits.clone()
    for i, s in enumerate(seqs):
        p = s.params
        if not p.penalized:
            continue
        output = counts(s.output_token_ids).float()
        row = out[i]
        rep = torch.tensor(p.repetition_penalty)
        if p.repetition_penalty != 1:
            seen = (counts(s.prompt_token_ids) + output) > 0
            row = torch.where(seen, torch.where(row > 0, row / rep, row * rep), row)
        freq, presence = torch.tensor(p.frequency_penalty), torch.tensor(p.presence_penalty)
        out[i] = row - freq * output - presence * (output > 0)
    return out


def test_the_penalties_touch_only_seen_tokens_and_equal_the_dense_form_bit_for_bit(engine):
    """Many rows, every mix of the three penalties (negative ones too), empty outputs, token ids past
    the vocabulary (ignored), repeated steps on the same sequences (the prompt's tokens are kept)."""
    rng = torch.Generator().manual_seed(11)
    vocab = 3000
    seqs = []
    for i in range(24):
        prompt = torch.randint(
            0, vocab + 20, (int(torch.randint(1, 300, (1,), generator=rng)),), generator=rng
        )
        output = torch.randint(0, vocab + 5, (int(torch.randint(0, 80, (1,), generator=rng)),), generator=rng)
        params = {
            "repetition_penalty": [1.0, 1.3, 0.7][i % 3],
            "frequency_penalty": [0.0, 0.5, -1.2, 0.0][i % 4],
            "presence_penalty": [0.0, 0.0, 0.3, -0.4, 1.1][i % 5],
        }
        seqs.append(seq(engine, prompt.tolist(), output.tolist(), **params))
    for step in range(2):
        logits = torch.randn(len(seqs), vocab, generator=rng) * 4
        logits[0, :5] = float("-inf")
        got = logits.clone()
        _penalize(got, seqs)
        assert torch.equal(got, dense_penalties(logits, seqs)), step
        for s in seqs:  # the next step: one more token each
            s.output_token_ids.append(int(torch.randint(0, vocab, (1,), generator=rng)))


def test_rows_without_penalties_are_untouched(engine):
    logits = torch.randn(2, VOCAB)
    seqs = [seq(engine, [1], [2, 2]), seq(engine, [1], [2, 2], presence_penalty=1.0)]
    got = logits.clone()
    _penalize(got, seqs)
    assert torch.equal(got[0], logits[0]) and not torch.equal(got[1], logits[1])


def reference_min_p(logits, temperature, min_p):
    probs = (logits / temperature).softmax(-1)
    keep = probs >= min_p * probs.max()
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9])
def test_min_p_equals_the_reference(engine, min_p):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3)) * 2
    s = seq(engine, [1], [], temperature=0.7, min_p=min_p)
    got = _filtered_probs(logits.clone(), [s])[0]
    assert torch.allclose(got, reference_min_p(logits[0], 0.7, min_p), atol=1e-6)


def test_min_p_does_not_change_greedy(engine):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(5))
    tokens, _ = sample(logits.clone(), [seq(engine, [1], [], min_p=0.9)])
    assert tokens == [int(logits.argmax())]


def prompt(engine) -> Prompt:
    return Prompt(engine.tokenizer.encode_chat([{"role": "user", "content": "Say something."}]))


def test_logit_bias_removes_and_forces_tokens(engine):
    base = engine.generate([(prompt(engine), SamplingParams(max_tokens=6))])[0].token_ids
    banned = engine.generate(
        [(prompt(engine), SamplingParams(max_tokens=6, logit_bias=((base[0], -100.0),)))]
    )[0].token_ids
    assert banned[0] != base[0]
    assert base[0] not in banned
    forced_token = 42 if base[0] != 42 else 43
    forced = engine.generate(
        [(prompt(engine), SamplingParams(max_tokens=6, logit_bias=((forced_token, 100.0),)))]
    )[0].token_ids
    assert forced == [forced_token] * 6


def test_sampled_logit_bias_forces_too(engine):
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=1, logit_bias=((42, 100.0),))
    assert engine.generate([(prompt(engine), params)])[0].token_ids == [42] * 4


def test_frequency_penalty_reduces_repeats(engine):
    def repeats(**kw) -> int:
        tokens = engine.generate([(prompt(engine), SamplingParams(max_tokens=40, ignore_eos=True, **kw))])[
            0
        ].token_ids
        return len(tokens) - len(set(tokens))

    assert repeats(frequency_penalty=2.0) < repeats()


@pytest.mark.parametrize(
    "field",
    [
        dict(presence_penalty=3),
        dict(frequency_penalty=-2.5),
        dict(repetition_penalty=0),
        dict(min_p=1.5),
        dict(logit_bias=((1, 101.0),)),
        dict(logit_bias=((-1, 1.0),)),
    ],
)
def test_out_of_range_values_are_refused(field):
    with pytest.raises(ValueError):
        SamplingParams(**field)
