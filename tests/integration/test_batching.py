"""Continuous batching: requests joining the decode batch at different steps each produce exactly what
they produce alone; KV exported from one pool and imported into another decodes on identically."""

from __future__ import annotations

import pytest

from serving.config import EngineConfig
from serving.engine.llm import LLMEngine
from serving.types import SamplingParams
from tests.conftest import make_image

REQUESTS = [
    ("Hello there.", [], SamplingParams(max_tokens=12)),
    ("Describe this picture with many words please.", [(56, 56)], SamplingParams(max_tokens=20)),
    ("What color?", [(84, 28)], SamplingParams(max_tokens=7)),
    ("Compare the two images.", [(28, 56), (70, 42)], SamplingParams(max_tokens=16)),
    ("Short.", [], SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=7)),
    ("A long prompt " * 12, [(101, 67)], SamplingParams(max_tokens=9)),
    ("Sampled with top k.", [(40, 40)], SamplingParams(max_tokens=14, temperature=1.2, top_k=20, seed=3)),
    ("Last one", [], SamplingParams(max_tokens=18)),
]


def prompts(engine: LLMEngine):
    return [
        (engine.inputs.from_user_prompt(text, [make_image(w, h, seed=i) for w, h in sizes]), params)
        for i, (text, sizes, params) in enumerate(REQUESTS)
    ]


def test_staggered_requests_equal_each_alone(engine):
    requests = prompts(engine)
    alone = [engine.generate([r])[0].token_ids for r in requests]

    # Add one request every other step, so each joins a decode batch already under way.
    outputs: dict[str, list[int]] = {}
    ids: list[str] = []
    pending = list(requests)
    step = 0
    max_batch = 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:
            prompt, params = pending.pop(0)
            ids.append(engine.add_request(prompt, params))
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
        max_batch = max(max_batch, len(engine.scheduler.running))
        step += 1
    assert max_batch >= 4, "requests should have overlapped in the decode batch"
    assert [outputs[i] for i in ids] == alone
    assert engine.runner.pool.num_free == engine.runner.pool.num_blocks


def test_all_at_once_equal_each_alone(engine):
    requests = prompts(engine)
    alone = [engine.generate([r])[0].token_ids for r in requests]
    together = [r.token_ids for r in engine.generate(requests)]
    assert together == alone


def test_step_token_budget_splits_prefills(tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=256, max_step_tokens=64))
    requests = prompts(engine)
    for prompt, params in requests:
        engine.add_request(prompt, params)
    first = engine.scheduler.schedule()
    assert first is not None and first.num_decode == 0  # nothing decodes yet: prefill chunks only
    assert 1 <= len(first.seqs) < len(requests)
    assert sum(first.q_lens) == 64


@pytest.mark.parametrize("index", [1, 3, 4])
def test_kv_export_import_continues_identically(engine, tiny_model, index):
    prompt, params = prompts(engine)[index]
    expected = engine.generate([(prompt, params)])[0]

    # A second engine with a differently sized pool and some blocks already taken, so the imported
    # request lands on other block ids than it had on the prefill side.
    decoder = LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=300, block_size=4))
    decoder.runner.pool.allocate(37)
    request_id = engine.add_request(prompt, params, prefill_only=True)
    first = engine.step()
    assert [d.request_id for d in first] == [request_id] and not first[0].finished
    prefilled = engine.export_kv(request_id)
    engine.release(request_id)
    assert engine.runner.pool.num_free == engine.runner.pool.num_blocks

    assert decoder.add_prefilled(prompt, params, prefilled)
    tokens = list(first[0].token_ids)
    text = first[0].text
    while decoder.has_unfinished():
        for delta in decoder.step():
            tokens.extend(delta.token_ids)
            text += delta.text
    assert tokens == expected.token_ids
    assert text == expected.text
