"""Sampling where the logits are: every tensor the sampler builds follows the logits' device (run on
PyTorch's `meta` device, where mixing in a CPU tensor is an error), and the device draw is a pure
function of each row's key that samples the filtered distribution."""

from __future__ import annotations

import collections

import torch

from serving.engine.inputs import Prompt
from serving.engine.sampler import _bias, _filtered_probs, _penalize, draw
from serving.types import SamplingParams

VOCAB = 40


def seqs(engine):
    cases = [
        dict(temperature=0.7, top_k=5, seed=1),
        dict(temperature=1.3, top_p=0.8, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.5),
        dict(temperature=0.9, frequency_penalty=0.3, logit_bias=((3, 5.0), (7, -100.0))),
    ]
    out = []
    for i, params in enumerate(cases):
        s = engine.make_sequence(f"s{i}", Prompt([1, 2, 3]), SamplingParams(max_tokens=8, **params))
        s.output_token_ids = [3, 3, 4]
        out.append(s)
    return out


def test_every_sampling_tensor_follows_the_logits_device(engine):
    rows = seqs(engine)
    logits = torch.empty(len(rows), VOCAB, device="meta")
    _penalize(logits, rows)
    _bias(logits, rows)
    probs = _filtered_probs(logits, rows)
    tokens = draw(probs, [s.sampling_key for s in rows])
    assert probs.device.type == "meta" and tokens.device.type == "meta" and tokens.shape == (3,)


def test_the_device_draw_is_a_pure_function_of_its_keys_and_samples_the_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 1.0, 0.0]])
    keys = [(k * 2654435761 & 0xFFFFFFFF, k * 40503 & 0xFFFFFFFF) for k in range(6000)]
    first = [draw(probs, [key, key]).tolist() for key in keys]
    assert first == [draw(probs, [key, key]).tolist() for key in keys]  # no hidden state
    assert all(b == 2 for _, b in first) and all(a != 3 for a, _ in first)  # zero-probability tokens never
    counts = collections.Counter(a for a, _ in first)
    for token, p in enumerate([0.5, 0.3, 0.2]):
        assert abs(counts[token] / len(keys) - p) < 0.02, counts  # ~3 standard deviations at n=6000


def test_a_seeded_key_depends_on_seed_and_output_index_alone(engine):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=42)
    a = engine.make_sequence("a", Prompt([1, 2]), params)
    b = engine.make_sequence("b", Prompt([9, 9, 9]), params)
    assert a.sampling_key == b.sampling_key
    a.output_token_ids.append(5)
    assert a.sampling_key != b.sampling_key
    b.output_token_ids.append(6)  # another token, the same index: the same key
    assert a.sampling_key == b.sampling_key
