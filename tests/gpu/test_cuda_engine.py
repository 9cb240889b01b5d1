"""The engine on a CUDA device, engine level only (no Ray, no NIXL), for `make test-gpu`: skipped
where PyTorch sees no GPU, so `make test` passes them by. Greedy tokens equal transformers' (float32
exactly, bfloat16 for the first tokens: the two round differently after that); seeded sampling is a
pure function of (seed, output index) on the device, across two runs and across a prefill → decode
handoff between engines; the KV pool lives on the device at the size its memory buys; and decode
throughput is printed (the small preset, and a model of Qwen2.5-VL-7B's width against the memory
bandwidth roofline)."""

from __future__ import annotations

import time

import pytest
import torch

from serving.config import EngineConfig
from serving.engine.inputs import Prompt
from serving.engine.kv_sizing import pool_blocks
from serving.engine.llm import LLMEngine
from serving.types import SamplingParams
from tests.conftest import make_image

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CASES = {"text": [], "one-image": [(56, 84)], "two-images": [(112, 56), (42, 70)]}
BF16_PREFIX = 4  # tokens that must agree in bfloat16 before the two implementations may drift


def engine(model_dir, dtype: str = "float32", **cfg) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), device="cuda", dtype=dtype, **cfg))


def prompt(e: LLMEngine, case: str) -> Prompt:
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(CASES[case])]
    return e.inputs.from_user_prompt("Describe what you see in detail.", images)


def reference(model_dir, e: LLMEngine, p: Prompt, dtype: torch.dtype, n: int) -> list[int]:
    from transformers import Qwen2VLForConditionalGeneration

    hf = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to("cuda").eval()
    ids = torch.tensor([p.token_ids], device="cuda")
    kwargs = {}
    if p.images:
        kwargs = dict(
            pixel_values=torch.cat([im.pixel_values for im in p.images]).to("cuda", dtype),
            image_grid_thw=torch.tensor([im.grid_thw for im in p.images], device="cuda"),
            mm_token_type_ids=(ids == e.model_config.image_token_id).int(),
        )
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kwargs
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers_in_float32(tiny_model, case):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    e = engine(tiny_model, num_kv_blocks=256, block_size=8)
    p = prompt(e, case)
    ours = e.generate([(p, SamplingParams(max_tokens=16))])[0].token_ids
    assert ours == reference(tiny_model, e, p, torch.float32, 16)


@pytest.mark.parametrize("case", list(CASES))
def test_bfloat16_first_tokens_equal_transformers(tiny_model, case):
    e = engine(tiny_model, "bfloat16", num_kv_blocks=256, block_size=8)
    p = prompt(e, case)
    ours = e.generate([(p, SamplingParams(max_tokens=BF16_PREFIX))])[0].token_ids
    assert ours == reference(tiny_model, e, p, torch.bfloat16, BF16_PREFIX)


def test_seeded_sampling_repeats_and_survives_a_handoff(tiny_model):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234)
    e = engine(tiny_model, num_kv_blocks=256, block_size=8)
    p = prompt(e, "one-image")
    first = e.generate([(p, params)])[0].token_ids
    assert first == e.generate([(p, params)])[0].token_ids
    # Prefilled here, decoded by another engine: the same tokens as undisturbed.
    decoder = engine(tiny_model, num_kv_blocks=300, block_size=8)
    request_id = e.add_request(p, params, prefill_only=True)
    (delta,) = e.step()
    prefilled = e.export_kv(request_id)
    e.release(request_id)
    assert decoder.add_prefilled(p, params, prefilled)
    tokens = list(delta.token_ids)
    while decoder.has_unfinished():
        for d in decoder.step():
            tokens.extend(d.token_ids)
    assert tokens == first


def test_the_pool_lives_on_the_device_at_the_size_its_memory_buys(tiny_model):
    e = engine(tiny_model, "bfloat16", kv_cache_memory_gb=0.5)
    assert e.runner.pool.data.device.type == "cuda"
    assert e.runner.pool.num_blocks == pool_blocks(e.cfg, e.model_config, 2)


def _decode(e: LLMEngine, batch: int, out_tokens: int) -> tuple[int, float, int]:
    """(tokens decoded, seconds, prompt tokens) for `batch` story requests together, after a warm-up."""
    requests = [
        (
            e.inputs.from_user_prompt(f"Request {i}: tell a story.", []),
            SamplingParams(max_tokens=out_tokens, ignore_eos=True),
        )
        for i in range(batch)
    ]
    e.generate(requests[:1])  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    done = e.generate(requests)
    torch.cuda.synchronize()
    return sum(len(r.token_ids) for r in done), time.perf_counter() - start, len(requests[0][0].token_ids)


def test_decode_throughput_is_printed(small_model):
    e = engine(small_model, "bfloat16", kv_cache_memory_gb=4.0)
    for batch in (1, 64):
        tokens, seconds, _ = _decode(e, batch, 128)
        print(f"\nsmall preset, bfloat16, batch {batch}: {tokens / seconds:.0f} tokens/s")


def _copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """Bytes per second the device moves in a large copy (read plus write): the roofline's slope,
    measured here rather than read off a datasheet."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * nbytes * 10 / (time.perf_counter() - start)


def test_decode_against_the_bandwidth_roofline(wide_model):
    """Decode is bandwidth-bound: a step reads every decoder weight once and each sequence's KV. At
    Qwen2.5-VL-7B's width (4 of its layers) the printed share of that bound is what the step loses to
    launches, the sampler and the host; batch 64 shows whether batching buys what it should."""
    e = engine(wide_model, "bfloat16", kv_cache_memory_gb=8.0, max_num_seqs=64)
    bandwidth = _copy_bandwidth()
    model = e.runner.model
    weights = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("visual.")
    )
    kv_per_token = e.model_config.kv_bytes_per_token(2)
    out_tokens = 64
    for batch in (1, 64):
        tokens, seconds, prompt_tokens = _decode(e, batch, out_tokens)
        assert tokens == batch * out_tokens
        context = prompt_tokens + out_tokens / 2  # a step's mean context
        step_bytes = weights + batch * context * kv_per_token
        bound = batch * bandwidth / step_bytes  # tokens/s if a step only read its bytes at copy speed
        print(
            f"\n7b-wide (4 layers), bfloat16, batch {batch}: {tokens / seconds:.0f} tokens/s; roofline "
            f"{bound:.0f} ({step_bytes / 2**30:.2f} GiB a step at {bandwidth / 1e9:.0f} GB/s copy): "
            f"{tokens / seconds / bound:.0%} of it (prefill included in the time)"
        )


def test_the_pool_fills_the_fraction_of_the_gpu_asked_for(tiny_model):
    """`gpu_memory_utilization`: the pool is what the fraction leaves after the weights and a profiled
    step; after serving, this process holds no more than that fraction (plus what other processes
    hold, counted against it)."""
    total = torch.cuda.mem_get_info()[1]
    e = engine(tiny_model, "bfloat16", gpu_memory_utilization=0.3)
    pool_bytes = e.runner.pool.data.numel() * e.runner.pool.data.element_size()
    assert e.runner.full_pool_blocks == e.runner.pool.num_blocks > 0
    assert 0.2 * total < pool_bytes < 0.3 * total
    e.generate([(prompt(e, "one-image"), SamplingParams(max_tokens=8))])
    assert torch.cuda.memory_reserved() < 0.3 * total
    print(f"\n0.3 of {total / 2**30:.1f} GiB: a pool of {pool_bytes / 2**30:.2f} GiB")
