"""KV crossing from prefill to decode in int8 (`--kv-transfer-dtype int8`): a registered staging area
of int8 blocks, each with one float32 scale per (layer, key or value, token, head).

The prefill worker quantizes a held request's blocks into staging blocks and publishes those
instead of its pool's; the decode worker pulls them into its own staging blocks and dequantizes into
the pool blocks it reserved. Symmetric per-token, per-head scales (the largest magnitude over the
head's dimensions / 127) keep every element within half a step of its scale: a head's outlier
costs only that head's token. Bytes on the wire fall by 4 × head_dim / (head_dim + 4) from float32
(3.76× at 64), 2 × head_dim / (head_dim + 4) from bfloat16. Lossy, so off by default.
"""

from __future__ import annotations

import threading

import torch

from serving.engine.kv_cache import BlockAllocator, KVPool, block_regions
from serving.types import Region

QMAX = 127.0


class KVStaging:
    def __init__(self, pool: KVPool, num_blocks: int) -> None:
        self.block_shape = tuple(pool.data.shape[1:])  # (layers, 2, block_size, kv_heads, head_dim)
        self.values = 1
        for n in self.block_shape:
            self.values *= n
        self.scales = self.values // self.block_shape[-1]
        self.block_nbytes = self.values + 4 * self.scales
        self.data = torch.zeros(num_blocks, self.block_nbytes, dtype=torch.uint8, device=pool.data.device)
        self._blocks = BlockAllocator(num_blocks)
        self._lock = threading.Lock()  # prefill's holds, decode's pulls and lease releases race

    @property
    def num_blocks(self) -> int:
        return self.data.shape[0]

    def allocate(self, n: int) -> list[int] | None:
        """`n` staging blocks, or None when that many are not free now."""
        with self._lock:
            if self._blocks.num_free < n:
                return None
            return self._blocks.allocate(n)

    def free(self, blocks: list[int]) -> None:
        with self._lock:
            self._blocks.free(blocks)

    def regions(self, blocks: list[int]) -> list[Region]:
        size = self.block_nbytes
        return [(first * size, count * size) for first, count in block_regions(blocks)]

    def pack(self, pool: KVPool, table: list[int], blocks: list[int]) -> None:
        """Quantize the pool's `table` blocks into staging `blocks` (same count, in order)."""
        device = pool.data.device
        source = pool.data.index_select(0, torch.tensor(table, dtype=torch.long, device=device)).float()
        scale = source.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / QMAX
        quantized = torch.round(source / scale).clamp_(-QMAX, QMAX).to(torch.int8)
        packed = torch.cat(
            [
                quantized.reshape(len(blocks), -1).view(torch.uint8),
                scale.reshape(len(blocks), -1).view(torch.uint8),
            ],
            dim=1,
        )
        self.data.index_copy_(0, torch.tensor(blocks, dtype=torch.long, device=device), packed)

    def unpack(self, pool: KVPool, table: list[int], blocks: list[int]) -> None:
        """Dequantize staging `blocks` into the pool's `table` blocks (same count, in order)."""
        device = pool.data.device
        packed = self.data.index_select(0, torch.tensor(blocks, dtype=torch.long, device=device))
        quantized = (
            packed[:, : self.values].contiguous().view(torch.int8).reshape(len(blocks), *self.block_shape)
        )
        scale = packed[:, self.values :].contiguous().view(torch.float32)
        scale = scale.reshape(len(blocks), *self.block_shape[:-1], 1)
        restored = (quantized.float() * scale).to(pool.data.dtype)
        pool.data.index_copy_(0, torch.tensor(table, dtype=torch.long, device=device), restored)
