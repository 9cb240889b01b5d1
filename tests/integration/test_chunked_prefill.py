"""Chunked prefill: a prompt prefilled over several steps (images cut mid-way included) gives exactly
the tokens of one whole prefill, and running requests keep decoding in every step while it runs."""

from __future__ import annotations

import time

import pytest
import torch

from serving.config import EngineConfig
from serving.engine.llm import LLMEngine
from serving.types import SamplingParams
from tests.conftest import make_image

CHUNK = 16  # the smallest step budget: a multimodal prompt needs many steps, images are cut


@pytest.fixture(scope="module")
def chunked(tiny_model) -> LLMEngine:
    # Prefix caching off: these tests count the steps a repeated prompt's prefill takes
    # (tests/unit/test_prefix_cache.py covers chunked prefill with cache hits).
    return LLMEngine(
        EngineConfig(
            model=str(tiny_model),
            num_kv_blocks=512,
            block_size=4,
            max_step_tokens=CHUNK,
            enable_prefix_caching=False,
        )
    )


def long_prompt(engine: LLMEngine, seed: int = 0):
    images = [make_image(101, 67, seed=seed), make_image(56, 84, seed=seed + 1)]
    return engine.inputs.from_user_prompt("Compare these two pictures in detail. " * 4, images)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_tokens=12, logprobs=2), SamplingParams(max_tokens=12, temperature=0.9, seed=5)],
)
def test_chunked_prompt_equals_whole_prefill(engine, chunked, params):
    whole = engine.generate([(long_prompt(engine), params)])[0]
    prompt = long_prompt(chunked)
    assert len(prompt.token_ids) > 4 * CHUNK
    request_id = chunked.add_request(prompt, params)
    steps = 0
    tokens: list[int] = []
    while chunked.has_unfinished():
        for delta in chunked.step():
            assert delta.request_id == request_id
            tokens.extend(delta.token_ids)
        steps += 1
    assert steps >= len(prompt.token_ids) // CHUNK + len(tokens) - 1  # the prompt really was chunked
    assert tokens == whole.token_ids
    assert chunked.runner.pool.num_free == chunked.runner.pool.num_blocks


def test_decode_goes_on_while_a_long_prompt_prefills(engine, chunked):
    short = [
        (chunked.inputs.from_user_prompt(text, []), SamplingParams(max_tokens=40, ignore_eos=True))
        for text in ("Hi.", "Count to three.")
    ]
    alone = [engine.generate([r])[0].token_ids for r in short]
    ids = [chunked.add_request(p, s) for p, s in short]
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    while any(len(v) < 2 for v in outputs.values()):
        for delta in chunked.step():
            outputs[delta.request_id].extend(delta.token_ids)

    prompt = long_prompt(chunked, seed=3)
    long_id = chunked.add_request(prompt, SamplingParams(max_tokens=4))
    outputs[long_id] = []
    prefill_steps = 0
    while not outputs[long_id]:
        deltas = chunked.step()
        batch = chunked.last_batch
        assert batch is not None
        # Every step: both running requests decode one token, and the prompt's chunk fills the rest.
        assert [s.request_id for s in batch.decoding] == ids
        assert [s.request_id for s in batch.prefilling] == [long_id]
        assert sum(batch.q_lens) <= CHUNK and batch.q_lens[:2] == [1, 1]
        assert {d.request_id for d in deltas if d.token_ids} >= set(ids)
        for delta in deltas:
            outputs[delta.request_id].extend(delta.token_ids)
        prefill_steps += 1
    assert prefill_steps >= len(prompt.token_ids) // (CHUNK - 2)
    while chunked.has_unfinished():
        for delta in chunked.step():
            outputs[delta.request_id].extend(delta.token_ids)
    assert [outputs[i] for i in ids] == alone
    assert (
        outputs[long_id]
        == engine.generate([(long_prompt(engine, seed=3), SamplingParams(max_tokens=4))])[0].token_ids
    )


def test_resumed_and_prefill_only_requests_chunk_too(engine, chunked, tiny_model):
    """The paths of decode migration (resume: recompute streamed tokens' KV) and of a disaggregated
    prefill worker (prefill_only, KV exported) give the same tokens when their prefill is chunked."""
    params = SamplingParams(max_tokens=10)
    expected = engine.generate([(long_prompt(engine, seed=5), params)])[0].token_ids

    rid = chunked.add_request(long_prompt(chunked, seed=5), params, resume=expected[:4])
    tokens = list(expected[:4])
    while chunked.has_unfinished():
        for delta in chunked.step():
            assert delta.request_id == rid
            tokens.extend(delta.token_ids)
    assert tokens == expected

    rid = chunked.add_request(long_prompt(chunked, seed=5), params, prefill_only=True)
    first: list[int] = []
    while not first:
        first = [t for d in chunked.step() for t in d.token_ids]
    assert not chunked.has_unfinished() and rid in chunked.held
    prefilled = chunked.export_kv(rid)
    chunked.release(rid)
    decoder = LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=300, block_size=4))
    assert decoder.add_prefilled(long_prompt(decoder, seed=5), params, prefilled)
    while decoder.has_unfinished():
        first.extend(t for d in decoder.step() for t in d.token_ids)
    assert first == expected
    assert torch.equal(
        torch.tensor(chunked.runner.pool.num_free), torch.tensor(chunked.runner.pool.num_blocks)
    )


def test_more_running_than_the_budget_take_turns(chunked):
    """20 decoding requests, a 16-token step: each step takes 16 of them, and the next step starts
    where it stopped, so every request advances at least once in any two steps. (Requests that joined
    with their KV from a prefill worker can outnumber the budget like this.)"""
    budget = chunked.scheduler.cfg
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    ids = [chunked.add_request(chunked.inputs.from_user_prompt(f"n {i}", []), params) for i in range(20)]
    try:
        chunked.scheduler.cfg = budget.model_copy(update={"max_step_tokens": 4096})  # all prefill at once
        chunked.step()
        assert len(chunked.scheduler.running) == 20
        chunked.scheduler.cfg = budget
        seen: list[set[str]] = []
        for _ in range(4):
            seen.append({d.request_id for d in chunked.step() if d.token_ids})
            assert len(seen[-1]) == CHUNK
        assert all(a | b == set(ids) for a, b in zip(seen, seen[1:], strict=False))
    finally:
        chunked.scheduler.cfg = budget
        for request_id in ids:
            chunked.abort(request_id)
    assert chunked.runner.pool.num_free == chunked.runner.pool.num_blocks


def test_prefill_time_spans_every_chunk_not_only_the_last(chunked):
    """The prefill time the engine reports for a request (its stage time in telemetry, vLLM's prefill
    time) runs from the step that took its first chunk to the step that computed its first token:
    with chunked prefill, every chunk's step is in it, not only the last one's."""
    prompt = long_prompt(chunked, seed=11)
    queued = time.perf_counter()
    chunked.add_request(prompt, SamplingParams(max_tokens=2), request_id="spanned")
    time.sleep(0.05)  # a wait in the queue before the first step: its queue time
    steps: list[tuple[float, float]] = []
    while "spanned" not in chunked.last_prefilled:
        start = time.perf_counter()
        chunked.step()
        steps.append((start, time.perf_counter()))
    span = chunked.last_prefilled["spanned"].prefill_s
    waited = chunked.last_prefilled["spanned"].prefill_queue_s
    assert len(steps) >= 4
    first_begun, last_begun, last_done = steps[0][0], steps[-1][0], steps[-1][1]
    # Inside [first step's start, last step's end], and longer than everything before the last step.
    assert last_begun - first_begun < span <= last_done - first_begun
    # The queue time runs from joining the engine to the first chunk's step, no more.
    assert 0.05 <= waited <= first_begun - queued
    while chunked.has_unfinished():
        chunked.step()
