"""Visual-KV compaction at the prefill→decode handoff (`visual_kv_budget`): decode over the compacted
KV equals a dense reference built apart from it — transformers' model, the whole prompt prefilled,
then every decoded token attending to the kept positions only (the evicted ones masked out) at the
positions it would have had; the P→D handoff carries exactly the kept rows; a budget of 1 is no
knob at all."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from serving.cluster import Cluster
from serving.config import EngineConfig
from serving.engine import compaction
from serving.engine.llm import LLMEngine
from serving.pipeline import Request
from serving.types import SamplingParams
from tests.conftest import make_image

BLOCK, MAX_TOKENS = 4, 12


@pytest.fixture(scope="module")
def cluster(tiny_model):
    c = Cluster.start(
        str(tiny_model), "e+p+d", runtime="local", engine=dict(num_kv_blocks=256, block_size=BLOCK)
    )
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def ours(tiny_model) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=256, block_size=BLOCK))


def served(cluster: Cluster, request: Request):
    async def run():
        tokens, last = [], None
        async for delta in cluster.pipeline.run(request):
            tokens.extend(delta.token_ids)
            last = delta
        return tokens, last

    return cluster.plane.run(run())


def kept_positions(engine: LLMEngine, prompt, params: SamplingParams) -> list[int]:
    """The positions the prefill keeps, from the engine's own scores (as a prefill worker's)."""
    rid = engine.add_request(prompt, params, prefill_only=True)
    while rid not in engine.held:
        engine.step()
    kept, blocks = engine.compact_held(rid)
    engine.free_blocks(blocks)
    engine.release(rid)
    return kept


def masked_reference(model, engine: LLMEngine, prompt, kept: list[int]) -> list[int]:
    """transformers' model: the whole prompt prefilled, then the evicted rows taken out of its cache,
    and every decoded token fed at the position it has without compaction (index + rope delta)."""
    ids = torch.tensor([prompt.token_ids])
    n = ids.shape[1]
    kwargs = dict(
        pixel_values=torch.cat([im.pixel_values for im in prompt.images]),
        image_grid_thw=torch.tensor([im.grid_thw for im in prompt.images]),
        mm_token_type_ids=(ids == engine.model_config.image_token_id).int(),
    )
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs)
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        rows = torch.tensor(kept)
        for layer in past.layers:
            layer.keys, layer.values = layer.keys[:, :, rows], layer.values[:, :, rows]
        delta = int(model.model.rope_deltas)
        tokens = [int(token)]
        for step in range(MAX_TOKENS - 1):
            out = model(
                input_ids=token.view(1, 1), position_ids=torch.full((3, 1, 1), n + step + delta),
                past_key_values=past, use_cache=True, cache_position=torch.tensor([len(kept) + step]),
            )  # fmt: skip
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            tokens.append(int(token))
    return tokens


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_compacted_decode_equals_a_masked_dense_reference(cluster, ours, tiny_model, budget):
    images = [make_image(112, 84, seed=5), make_image(56, 70, seed=6)]
    prompt = ours.inputs.from_user_prompt("Describe both of them.", images)
    spec, arrays = ours.inputs.spec_from_user_prompt("Describe both of them.", images)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, visual_kv_budget=budget)
    kept = kept_positions(ours, prompt, params)
    pads = ours.model_config.media_pad_ids
    visual = sum(t in pads for t in prompt.token_ids)
    assert len(prompt.token_ids) - len(kept) == visual - max(1, round(visual * budget))
    assert all(prompt.token_ids[p] in pads for p in set(range(len(prompt.token_ids))) - set(kept))
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    want = masked_reference(model, ours, prompt, kept)
    # The reference itself, with nothing evicted, is the engine's uncompacted answer.
    whole_reference = masked_reference(model, ours, prompt, list(range(len(prompt.token_ids))))
    plain = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    assert whole_reference == ours.generate([(prompt, plain)])[0].token_ids
    tokens, last = served(cluster, Request(f"compact-{budget}", spec, params, arrays))
    assert tokens == want
    assert last.timings.p2d_bytes == -(-len(kept) // BLOCK) * ours.runner.pool.block_nbytes
    # the first token is the prefill's, over the whole prompt: the same as without compaction
    whole, _ = served(
        cluster,
        Request(f"whole-{budget}", spec, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), arrays),
    )
    assert tokens[0] == whole[0]


def test_a_budget_of_one_is_no_knob(cluster, ours):
    spec, arrays = ours.inputs.spec_from_user_prompt("What is it?", [make_image(84, 56, seed=9)])
    plain, last = served(
        cluster, Request("plain", spec, SamplingParams(max_tokens=8, ignore_eos=True), arrays)
    )
    one, one_last = served(
        cluster,
        Request("one", spec, SamplingParams(max_tokens=8, ignore_eos=True, visual_kv_budget=1.0), arrays),
    )
    assert one == plain and one_last.timings.p2d_bytes == last.timings.p2d_bytes


def test_selection_keeps_text_and_the_best_scored_visual_tokens():
    ids = [1, 5, 5, 5, 5, 2, 3]
    scores = torch.tensor([9.0, 0.1, 0.7, 0.2, 0.9, 0.0, 0.0])
    assert compaction.select(scores, ids, (5,), 0.5, 9) == [0, 2, 4, 5, 6, 7, 8]
    assert compaction.select(scores, ids, (5,), 0.01, 7) == [0, 4, 5, 6]
    assert compaction.select(scores, ids, (5,), 1.0, 7) == list(range(7))
