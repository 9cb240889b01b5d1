"""KV pool sizing: sizes in bytes as people write them, the pool a memory budget buys, and the
refusal of a pool that cannot hold one `max_model_len` request, with the numbers."""

from __future__ import annotations

import pytest

from serving.config import EngineConfig
from serving.engine.kv_sizing import KVPoolTooSmall, check_fits, parse_bytes, pool_blocks
from serving.engine.models.config import load_model_config


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("8GiB", 8 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        ("1000000", 10**6),
        ("64 kb", 64_000),
    ],
)
def test_sizes_in_bytes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "0", "8 GiBs"])
def test_what_is_not_a_size_is_refused(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_the_pool_a_budget_buys_and_the_refusal_with_the_numbers(tiny_model):
    model = load_model_config(tiny_model)
    per_token = model.kv_bytes_per_token(4)
    cfg = EngineConfig(model=str(tiny_model), kv_cache_memory_gb=per_token * 64 * 100 / 2**30, block_size=64)
    assert pool_blocks(cfg, model, 4) == 100
    assert check_fits(cfg.model_copy(update={"max_model_len": 6400}), model, 4) == 100
    with pytest.raises(KVPoolTooSmall) as refused:
        check_fits(cfg.model_copy(update={"max_model_len": 6401}), model, 4)
    assert "holds 6400 tokens (100 blocks of 64" in str(refused.value)
    assert "fewer than --max-model-len 6401" in str(refused.value)
    assert pool_blocks(cfg.model_copy(update={"num_kv_blocks": 7}), model, 4) == 7


def test_the_pool_a_gpu_fraction_buys():
    """vLLM's arithmetic: the fraction of the device, less the weights, the activation peak and what
    torch does not hold (the CUDA context, other processes)."""
    from serving.engine.kv_sizing import DeviceMemory, budget_blocks

    gib = 2**30
    memory = DeviceMemory(total=80 * gib, free=60 * gib, reserved=18 * gib, weights=16 * gib, peak=2 * gib)
    # 0.9 × 80 = 72; less 16 weights, 2 peak, 2 others (80 - 60 used, 18 of it torch's) = 52 GiB.
    assert budget_blocks(memory, 0.9, gib) == 52
    assert budget_blocks(memory, 0.9, 2**20) == 52 * 1024
    assert budget_blocks(memory, 0.2, gib) == 0  # the weights alone are more than a fifth


def test_a_measured_pool_too_small_names_what_sized_it(tiny_model):
    model = load_model_config(tiny_model)
    cfg = EngineConfig(model=str(tiny_model), block_size=16, max_model_len=4096)
    assert check_fits(cfg, model, 2, blocks=256, source="--gpu-memory-utilization (now 0.5)") == 256
    with pytest.raises(KVPoolTooSmall) as refused:
        check_fits(cfg, model, 2, blocks=255, source="--gpu-memory-utilization (now 0.5)")
    assert "holds 4080 tokens" in str(refused.value)
    assert "raise --gpu-memory-utilization (now 0.5)" in str(refused.value)


def test_a_gpu_fraction_is_refused_without_a_gpu(tiny_model):
    from serving.engine.runner import ModelRunner

    cfg = EngineConfig(model=str(tiny_model), device="cpu", gpu_memory_utilization=0.9)
    with pytest.raises(ValueError, match="--kv-cache-memory"):
        ModelRunner(cfg)


def test_the_profiling_step_runs_the_largest_step(tiny_model):
    """What the GPU profile measures, run on the CPU: a `max_step_tokens` prompt through the decoder
    and the LM head, and the vision tower at the pixel budget, within a pool of one step's blocks."""
    from serving.engine.llm import LLMEngine

    engine = LLMEngine(
        EngineConfig(model=str(tiny_model), device="cpu", num_kv_blocks=40, block_size=8, max_step_tokens=256)
    )
    engine.runner.profile_forward()
    assert engine.runner.pool.data[:32].abs().sum() > 0  # its keys and values landed in 256 / 8 blocks
    assert engine.runner.full_pool_blocks == 40


def test_epd_serve_refuses_a_gpu_fraction_without_a_gpu(tiny_model):
    from serving.cli import build_parser, serve_settings

    args = build_parser().parse_args(["serve", "--model", str(tiny_model), "--gpu-memory-utilization", "0.9"])
    with pytest.raises(SystemExit, match="no GPU is used here"):
        serve_settings(args, "x", gpus=0)
