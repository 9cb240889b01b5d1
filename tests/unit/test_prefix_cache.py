"""Automatic prefix caching: the allocator's reference counts, LRU of cached free blocks and eviction;
the chained block hashes (images by content); and the engine reusing a cached prefix with exactly the
tokens it gives without the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.config import EngineConfig
from serving.engine.kv_cache import KVPool, OutOfBlocks, prompt_block_hashes
from serving.engine.llm import LLMEngine
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence
from serving.types import SamplingParams
from tests.conftest import make_image

BS = 4
PAD = 99


def pool(num_blocks: int = 8) -> KVPool:
    return KVPool(
        num_layers=1, num_kv_heads=1, head_dim=2, block_size=BS, num_blocks=num_blocks, dtype=torch.float32
    )


def h(i: int) -> bytes:
    return bytes([i]) * 16


# -- the allocator --------------------------------------------------------------------------------


def test_refcounts_share_and_free():
    p = pool()
    table = p.allocate(2)
    assert p.register(table[0], h(1)) and p.register(table[1], h(2))
    assert p.lookup_prefix([h(1), h(2), h(3)]) == table
    other = p.lookup_prefix([h(1)])
    p.share(other)  # a second request holds block 0 too
    assert p.refcount(table[0]) == 2 and p.num_in_use(other) == 1
    p.free(table)
    assert table == [] and p.refcount(0) == 1 and p.num_free == 7
    p.free(table)  # the same (emptied) table again: nothing happens
    with pytest.raises(RuntimeError, match="freed more often"):
        p.free([1])  # block 1 is held by nobody now
    with pytest.raises(RuntimeError, match="freed more often"):
        p.free([0, 0])  # held once, freed twice: refused before anything changes
    assert p.refcount(0) == 1
    p.free(other)
    assert p.num_free == 8 and p.usage == 0.0
    assert p.num_cached_blocks == 2  # free, but still named: a later request can hit them
    assert p.lookup_prefix([h(1), h(2)]) == [0, 1]


def test_cached_blocks_count_as_free_and_are_evicted_last_lru_first():
    p = pool(6)
    a = p.allocate(3)
    for i, block in enumerate(a):
        p.register(block, h(10 + i))
    p.free(a)  # tail first: block 2 is the oldest cached block, block 0 the newest
    assert p.num_free == 6 and p.usage == 0.0
    fresh = p.allocate(3)  # uncached blocks go first: the cache survives
    assert fresh == [3, 4, 5] and p.num_evictions == 0
    assert p.lookup_prefix([h(10), h(11), h(12)]) == [0, 1, 2]
    got = p.allocate(1)
    assert got == [2] and p.num_evictions == 1  # the prompt's last block goes first
    assert p.lookup_prefix([h(10), h(11), h(12)]) == [0, 1]
    assert p.lookup_prefix([h(12)]) == []  # an evicted block's hash is forgotten
    p.share([0])  # a hit on a cached free block takes it off the LRU
    assert p.num_free == 1
    assert p.allocate(1) == [1]
    with pytest.raises(OutOfBlocks):
        p.allocate(1)
    p.free([0, 1, 2, 3, 4, 5])
    assert p.num_free == 6


def test_register_rules_and_reset():
    p = pool(4)
    a, b = p.allocate(2)
    assert p.register(a, h(1))
    assert not p.register(b, h(1))  # the same prefix computed twice: the second copy stays private
    assert not p.register(a, h(2))  # a block is named once
    p.free([a, b])
    with pytest.raises(RuntimeError, match="only a held block"):
        p.register(b, h(3))
    assert p.num_cached_blocks == 1
    p.reset_prefix_cache()
    assert p.num_cached_blocks == 0 and p.num_free == 4 and p.lookup_prefix([h(1)]) == []
    with pytest.raises(RuntimeError, match="not in the prefix cache"):
        p.share([a])


# -- hashes ---------------------------------------------------------------------------------------


def test_hashes_chain_over_the_whole_prefix():
    one = prompt_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS, PAD, [])
    assert len(one) == 2  # full blocks only
    two = prompt_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, PAD, [])
    assert two == one
    other_head = prompt_block_hashes([0, 2, 3, 4, 5, 6, 7, 8], BS, PAD, [])
    assert other_head[0] != one[0] and other_head[1] != one[1]  # same second block, other prefix


def test_hashes_tell_images_apart_by_content():
    tokens = [1, 2, PAD, PAD, PAD, PAD, PAD, PAD, 3, 4, 5, 6]
    cat = prompt_block_hashes(tokens, BS, PAD, [(b"cat", 6)])
    dog = prompt_block_hashes(tokens, BS, PAD, [(b"dog", 6)])
    assert cat == prompt_block_hashes(tokens, BS, PAD, [(b"cat", 6)])  # the same image hits
    assert cat[0] != dog[0] and cat[1] != dog[1] and cat[2] != dog[2]  # the block after too (chain)
    before = prompt_block_hashes([1, 2, 3, 4, *tokens], BS, PAD, [(b"cat", 6)])
    assert before[0] == prompt_block_hashes([1, 2, 3, 4, *tokens], BS, PAD, [(b"dog", 6)])[0]
    # Two images meeting inside one block: both are part of its hash, and their order matters.
    two = [PAD, PAD, PAD, PAD]
    ab = prompt_block_hashes(two, BS, PAD, [(b"a", 2), (b"b", 2)])
    ba = prompt_block_hashes(two, BS, PAD, [(b"b", 2), (b"a", 2)])
    assert ab != ba
    # Unknown image content: nothing from the first pad block on is cacheable.
    assert len(prompt_block_hashes(tokens, BS, PAD, None)) == 0
    assert len(prompt_block_hashes([7, 7, 7, 7, *tokens], BS, PAD, None)) == 1


def test_admission_counts_shared_blocks_as_free_and_never_hits_the_last_token():
    p = pool(8)
    cfg = EngineConfig(model="unused", block_size=BS, max_step_tokens=64, max_prefill_tokens=64)
    sched = Scheduler(cfg, p)
    prompt = list(range(1, 13))  # 3 full blocks
    hashes = prompt_block_hashes(prompt, BS, PAD, [])
    owner = p.allocate(3)
    for block, hsh in zip(owner, hashes, strict=True):
        p.register(block, hsh)
    seq = Sequence(
        "r",
        prompt,
        SamplingParams(max_tokens=16),  # 28 tokens: 7 blocks, 2 of them shared
        detokenizer=None,  # type: ignore[arg-type]
        eos_token_ids=(),
        max_model_len=64,
        block_hashes=hashes,
    )
    hit = sched.prefix_hit(seq)
    assert hit == owner[:2]  # the last prompt token is recomputed, so the last block is not taken
    assert sched.can_admit(seq, hit=hit)  # 5 free blocks + 2 shared with the running owner...
    assert not sched.can_admit(seq)  # ...but not without sharing
    sched.add(seq)
    batch = sched.schedule()
    assert batch is not None and batch.q_lens == [4]
    assert seq.num_cached == 8 and seq.num_prefix_hit == 8 and seq.block_table == owner[:2]
    assert p.refcount(owner[0]) == 2
    assert (sched.prefix_queried_tokens, sched.prefix_hit_tokens) == (12, 8)
    sched.finish(seq)
    assert p.refcount(owner[0]) == 1 and seq.block_table == []


# -- the engine -----------------------------------------------------------------------------------


def make_engine(model: Path, caching: bool, **kw: int) -> LLMEngine:
    cfg = dict(num_kv_blocks=256, block_size=BS) | kw
    return LLMEngine(EngineConfig(model=str(model), enable_prefix_caching=caching, **cfg))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def off(tiny_model: Path) -> LLMEngine:
    return make_engine(tiny_model, caching=False)


@pytest.fixture
def on(tiny_model: Path) -> LLMEngine:
    return make_engine(tiny_model, caching=True)


def run(engine: LLMEngine, prompt, params: SamplingParams) -> tuple[list[int], int]:
    """Greedy tokens of one request alone, and the prompt tokens the engine computed for it."""
    before = engine.prefill_tokens_computed
    tokens = engine.generate([(prompt, params)])[0].token_ids
    return tokens, engine.prefill_tokens_computed - before


def all_free(engine: LLMEngine) -> bool:
    p = engine.runner.pool
    return p.num_free == p.num_blocks and all(p.refcount(b) == 0 for b in range(p.num_blocks))


def shared_full_blocks(a: list[int], b: list[int]) -> int:
    n = 0
    while (n + 1) * BS <= min(len(a), len(b)) and a[n * BS : (n + 1) * BS] == b[n * BS : (n + 1) * BS]:
        n += 1
    return n


PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
LONG = "Describe the history of the printing press and its effect on literacy in Europe. " * 3


def test_shared_prefix_same_tokens_and_only_the_rest_computed(on, off):
    first = on.inputs.from_user_prompt(LONG + "Be brief.", [])
    second = on.inputs.from_user_prompt(LONG + "Be very detailed, please.", [])
    a, computed_a = run(on, first, PARAMS)
    assert computed_a == len(first.token_ids) and on.scheduler.prefix_hit_tokens == 0
    b, computed_b = run(on, second, PARAMS)
    hit = shared_full_blocks(first.token_ids, second.token_ids) * BS
    assert hit >= len(LONG) // 8  # a long shared prefix (a token is at most a few characters)
    assert computed_b == len(second.token_ids) - hit
    assert on.scheduler.prefix_hit_tokens == hit
    assert on.scheduler.prefix_queried_tokens == len(first.token_ids) + len(second.token_ids)
    assert (a, b) == (run(off, first, PARAMS)[0], run(off, second, PARAMS)[0])
    # The same prompt again: everything but the block holding the last prompt token is a hit.
    again, computed = run(on, second, PARAMS)
    assert again == b and 1 <= computed <= BS
    assert all_free(on) and off.scheduler.prefix_hit_tokens == 0


def test_concurrent_requests_share_blocks_computed_by_a_running_one(on, off):
    first = on.inputs.from_user_prompt(LONG + "One.", [])
    second = on.inputs.from_user_prompt(LONG + "Two, longer.", [])
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ra = on.add_request(first, params)
    out: dict[str, list[int]] = {ra: []}
    for d in on.step():  # the first prefills (and its blocks are registered) while it keeps running
        out[d.request_id].extend(d.token_ids)
    rb = on.add_request(second, params)
    out[rb] = []
    while on.has_unfinished():
        for d in on.step():
            out[d.request_id].extend(d.token_ids)
    assert on.scheduler.prefix_hit_tokens == shared_full_blocks(first.token_ids, second.token_ids) * BS > 0
    assert out[ra] == run(off, first, params)[0] and out[rb] == run(off, second, params)[0]
    assert all_free(on)


def test_images_hit_only_when_they_are_the_same(on, off):
    text = "What is in this picture? Answer in one word."
    same = on.inputs.from_user_prompt(text, [make_image(64, 56, seed=1)])
    again = on.inputs.from_user_prompt(text, [make_image(64, 56, seed=1)])
    other = on.inputs.from_user_prompt(text, [make_image(64, 56, seed=2)])
    assert same.token_ids == other.token_ids  # only the image tells them apart
    first_pad = same.token_ids.index(on.model_config.image_token_id)
    last_pad = len(same.token_ids) - 1 - same.token_ids[::-1].index(on.model_config.image_token_id)

    expected_same, _ = run(off, same, PARAMS)
    expected_other, _ = run(off, other, PARAMS)
    assert run(on, same, PARAMS)[0] == expected_same
    tokens, computed = run(on, other, PARAMS)
    assert tokens == expected_other
    hit = len(other.token_ids) - computed
    assert hit <= first_pad  # nothing from the block of the first pad on came from the other image
    encoded: list[int] = []
    encode = on.runner.encode
    on.runner.encode = lambda images: encoded.append(len(images)) or encode(images)  # type: ignore[method-assign]
    tokens, computed = run(on, again, PARAMS)
    assert tokens == expected_same
    assert len(again.token_ids) - computed > last_pad  # the repeated image is reused whole...
    assert encoded == []  # ...and not even encoded again
    assert all_free(on)


def test_images_sent_as_embeddings_hit_by_content(on, off):
    text = "Name the colour."
    image = make_image(56, 56, seed=7)
    prompt = on.inputs.from_user_prompt(text, [image])
    embeds = on.runner.encode(prompt.images)[0]
    bare = type(prompt)(prompt.token_ids, grids=list(prompt.grids))
    expected, _ = run(off, prompt, PARAMS)
    before = on.prefill_tokens_computed
    rid = on.add_request(bare, PARAMS, image_embeds=embeds.clone())
    while on.has_unfinished():
        on.step()
    assert on.prefill_tokens_computed - before == len(prompt.token_ids)
    before = on.prefill_tokens_computed
    rid = on.add_request(bare, PARAMS, image_embeds=embeds.clone())
    tokens: list[int] = []
    while on.has_unfinished():
        tokens.extend(t for d in on.step() if d.request_id == rid for t in d.token_ids)
    assert tokens == expected
    assert on.prefill_tokens_computed - before <= BS
    other = on.runner.encode([on.inputs.from_user_prompt(text, [make_image(56, 56, seed=8)]).images[0]])[0]
    before = on.prefill_tokens_computed
    on.add_request(bare, PARAMS, image_embeds=other)
    while on.has_unfinished():
        on.step()
    first_pad = prompt.token_ids.index(on.model_config.image_token_id)
    assert len(prompt.token_ids) - (on.prefill_tokens_computed - before) <= first_pad


def test_chunked_prefill_resume_and_export_with_hits(tiny_model, off):
    """A cached prefix under chunked prefill, the resume path and a prefill-only request whose KV (its
    shared blocks included) is exported to a decode engine: the same tokens as without the cache."""
    chunked = make_engine(tiny_model, caching=True, max_step_tokens=16)
    images = [make_image(101, 67, seed=3), make_image(56, 84, seed=4)]
    prompt = chunked.inputs.from_user_prompt("Compare these two pictures in detail. " * 4, images)
    params = SamplingParams(max_tokens=10)
    expected, _ = run(off, prompt, params)
    assert run(chunked, prompt, params)[0] == expected
    tokens, computed = run(chunked, prompt, params)
    assert tokens == expected and computed <= BS

    rid = chunked.add_request(prompt, params, resume=expected[:4])
    resumed = list(expected[:4])
    while chunked.has_unfinished():
        resumed.extend(t for d in chunked.step() if d.request_id == rid for t in d.token_ids)
    assert resumed == expected

    rid = chunked.add_request(prompt, params, prefill_only=True)
    first: list[int] = []
    while not first:
        first = [t for d in chunked.step() for t in d.token_ids]
    seq = chunked.held[rid]
    assert seq.num_prefix_hit > 0 and chunked.runner.pool.refcount(seq.block_table[0]) == 1
    prefilled = chunked.export_kv(rid)
    chunked.release(rid)
    assert all_free(chunked)
    decoder = make_engine(tiny_model, caching=True, num_kv_blocks=300)
    decoder.runner.pool.allocate(37)
    assert decoder.add_prefilled(prompt, params, prefilled)
    while decoder.has_unfinished():
        first.extend(t for d in decoder.step() for t in d.token_ids)
    assert first == expected
    assert decoder.runner.pool.num_cached_blocks == 0  # imported blocks are not cached

    cached = chunked.runner.pool.num_cached_blocks
    assert cached > 0
    chunked.resize_kv(200)  # a role switch: the cache of the old pool is dropped with it
    assert chunked.runner.pool.num_blocks == 200 and chunked.runner.pool.num_cached_blocks == 0
    tokens, computed = run(chunked, prompt, params)
    assert tokens == expected and computed == len(prompt.token_ids)


def test_cancel_mid_prefill_frees_everything(tiny_model):
    chunked = make_engine(tiny_model, caching=True, max_step_tokens=16)
    prompt = chunked.inputs.from_user_prompt(LONG, [make_image(64, 64, seed=5)])
    run(chunked, prompt, SamplingParams(max_tokens=2))
    longer = chunked.inputs.from_user_prompt(LONG + "And then more. " * 5, [make_image(64, 64, seed=5)])
    rid = chunked.add_request(longer, SamplingParams(max_tokens=4))
    chunked.step()
    chunked.step()
    seq = chunked.scheduler.prefilling[0]
    assert seq.num_prefix_hit > 0 and not seq.prefill_done  # shares cached blocks, still prefilling
    chunked.abort(rid)
    assert all_free(chunked) and not chunked.has_unfinished()
    chunked.abort(rid)  # a second cancel frees nothing twice
    assert all_free(chunked)
    assert chunked.runner.pool.num_cached_blocks > 0


def test_failed_request_frees_its_references_and_others_go_on(on, off):
    prompt = on.inputs.from_user_prompt(LONG + "Go.", [])
    expected, _ = run(off, prompt, PARAMS)
    run(on, prompt, PARAMS)
    bad = on.add_request(prompt, PARAMS)
    good = on.add_request(prompt, PARAMS)

    def fault(stage: str, ids: list[str]) -> None:
        if stage == "prefill" and bad in ids:
            raise RuntimeError("injected")

    on.fault_hook = fault
    out: dict[str, list[int]] = {bad: [], good: []}
    errors = []
    while on.has_unfinished():
        for d in on.step():
            out[d.request_id].extend(d.token_ids)
            if d.error:
                errors.append(d.request_id)
    on.fault_hook = None
    assert errors == [bad] and out[good] == expected
    assert all_free(on)
    assert run(on, prompt, PARAMS)[0] == expected  # the shared blocks were not damaged


def test_pool_exhaustion_evicts_cached_blocks_instead_of_refusing(tiny_model, off):
    small = make_engine(tiny_model, caching=True, num_kv_blocks=60)
    first = small.inputs.from_user_prompt(LONG, [])
    second = small.inputs.from_user_prompt("Something else entirely. " * 6, [])
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    run(small, first, params)
    pool = small.runner.pool
    assert pool.num_free == pool.num_blocks
    # The second request fits only if cached blocks of the first give way.
    assert pool.num_cached_blocks + pool.blocks_for(len(second.token_ids) + 4) > pool.num_blocks
    tokens, computed = run(small, second, params)
    # The shared chat-template head still hits: eviction takes a prompt's tail blocks first.
    assert computed == len(second.token_ids) - shared_full_blocks(first.token_ids, second.token_ids) * BS
    assert tokens == run(off, second, params)[0]
    assert pool.num_evictions > 0 and all_free(small)
