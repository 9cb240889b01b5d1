"""How large a worker's KV pool is, and the check that it can hold the longest request the server
accepts: a pool smaller than `max_model_len` would take a request the gateway admitted and fail it
inside the worker, so such a deployment is refused at start, with the numbers."""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def check_fits(
    cfg: EngineConfig, model: ModelConfig, dtype_bytes: int, blocks: int | None = None, source: str = ""
) -> int:
    """The full pool's blocks (`blocks` when measured on the device, else from the config);
    KVPoolTooSmall when it holds fewer than `max_model_len` tokens. `source`: what sized it."""
    blocks = pool_blocks(cfg, model, dtype_bytes) if blocks is None else blocks
    tokens = blocks * cfg.block_size
    if tokens < cfg.max_model_len:
        per_token = model.kv_bytes_per_token(dtype_bytes)
        needed = -(-cfg.max_model_len // cfg.block_size) * cfg.block_size * per_token
        remedy = (
            f"raise {source}" if source else f"give it at least --kv-cache-memory {needed / 2**30:.3f}GiB"
        )
        raise KVPoolTooSmall(
            f"the KV pool holds {tokens} tokens ({blocks} blocks of {cfg.block_size}, "
            f"{per_token} bytes per token), fewer than --max-model-len {cfg.max_model_len} "
            f"({needed / 2**30:.3f} GiB): {remedy}, or lower --max-model-len"
        )
    return blocks


@dataclass(frozen=True)
class DeviceMemory:
    """A GPU's memory as measured after loading the weights and one profiling forward, in bytes."""

    total: int  # the device's memory
    free: int  # what the driver reports free now
    reserved: int  # what this process's torch allocator holds (weights, the profile's freed blocks)
    weights: int  # allocated by torch after loading: weights, buffers, the profiling pool
    peak: int  # the profiling forward's peak above `weights`: activations of the largest step


def budget_blocks(memory: DeviceMemory, utilization: float, bytes_per_block: int) -> int:
    """KV blocks that fit in `utilization` of the device's memory after the weights, the activation
    peak, and whatever else holds device memory (the CUDA context, other processes: used memory that
    torch's allocator does not hold), as vLLM sizes its pool."""
    others = max(0, memory.total - memory.free - memory.reserved)
    budget = memory.total * utilization - memory.weights - memory.peak - others
    return max(0, int(budget) // bytes_per_block)
