"""KV admission on a decode worker counts the growth of requests whose KV is still arriving from a
prefill worker: a request the pool could not carry to its end waits (reserve says no) rather than
being admitted and failing later with no free block."""

from __future__ import annotations

from serving.config import EngineConfig
from serving.engine.inputs import Prompt
from serving.engine.llm import LLMEngine
from serving.types import FinishReason, SamplingParams


def test_reserved_requests_growth_is_counted(tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=16, block_size=4))
    prompt = Prompt(list(range(10, 18)))  # 8 tokens: 2 blocks
    long = SamplingParams(max_tokens=32, ignore_eos=True)  # reaches 40 tokens: 10 blocks
    assert engine.reserve("a", prompt, long, kv_tokens=8) is not None
    # 14 blocks free, but "a" will grow by 8 of them: another 10-block request cannot be carried.
    assert engine.reserve("b", prompt, long, kv_tokens=8) is None
    short = SamplingParams(max_tokens=8, ignore_eos=True)  # 16 tokens: 4 blocks, which fit
    assert engine.reserve("c", prompt, short, kv_tokens=8) is not None
    engine.abort("a")
    assert engine.reserve("b", prompt, long, kv_tokens=8) is not None


def test_a_full_pool_never_fails_a_decode(tiny_model):
    """Requests joined from reservations decode to their end while the pool stays full: nothing is
    admitted past what the pool can carry."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=24, block_size=4))
    prompt = Prompt(list(range(20, 28)))
    params = SamplingParams(max_tokens=24, ignore_eos=True)  # 32 tokens: 8 blocks each
    joined = []
    for i in range(6):
        table = engine.reserve(f"r{i}", prompt, params, kv_tokens=8)
        if table is None:
            continue
        # The KV "arrives" (zeros stand in: the point is the blocks), then the request joins.
        engine.join_reserved(f"r{i}", first_token=5, rope_delta=0, kv_tokens=8)
        joined.append(f"r{i}")
    assert len(joined) == 3, "three 8-block requests fill 24 blocks"
    finished = {}
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.finish_reason is not None:
                finished[delta.request_id] = delta.finish_reason
    assert finished == {r: FinishReason.LENGTH for r in joined}
