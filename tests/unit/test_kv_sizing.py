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
