"""How large a worker's KV pool is, and the check that it can hold the longest request the server
accepts: a pool smaller than `max_model_len` would take a request the gateway admitted and fail it
inside the worker, so such a deployment is refused at start, with the numbers."""

from __future__ import annotations

import re

from serving.config import EngineConfig
from serving.engine.models.config import ModelConfig

_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


class KVPoolTooSmall(ValueError):
    """The KV pool cannot hold one request of `max_model_len` tokens."""


def parse_bytes(text: str) -> int:
    """`8GiB`, `512MiB`, `1.5G`, `1000000`: a size in bytes (decimal and binary suffixes, `B` optional)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise ValueError(f"not a size in bytes: {text!r} (e.g. 8GiB, 512MiB, 1000000)")
    number, unit = float(match.group(1)), match.group(2) or ""
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size must be positive: {text!r}")
    return size


def pool_blocks(cfg: EngineConfig, model: ModelConfig, dtype_bytes: int) -> int:
    """The full pool (a decode worker's) in blocks: `num_kv_blocks`, or what `kv_cache_memory_gb`
    holds at `dtype_bytes` per element."""
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    per_block = model.kv_bytes_per_token(dtype_bytes) * cfg.block_size
    return max(1, int(cfg.kv_cache_memory_gb * 2**30) // per_block)


def check_fits(cfg: EngineConfig, model: ModelConfig, dtype_bytes: int) -> int:
    """The full pool's blocks; KVPoolTooSmall when it holds fewer than `max_model_len` tokens."""
    blocks = pool_blocks(cfg, model, dtype_bytes)
    tokens = blocks * cfg.block_size
    if tokens < cfg.max_model_len:
        per_token = model.kv_bytes_per_token(dtype_bytes)
        needed = -(-cfg.max_model_len // cfg.block_size) * cfg.block_size * per_token
        raise KVPoolTooSmall(
            f"the KV pool holds {tokens} tokens ({blocks} blocks of {cfg.block_size}, "
            f"{per_token} bytes per token), fewer than --max-model-len {cfg.max_model_len}: give it at "
            f"least --kv-cache-memory {needed / 2**30:.3f}GiB, or lower --max-model-len"
        )
    return blocks
