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
CHUNK_BLOCKS = 64  # blocks quantized or restored at once: bounds the float32 copies


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
        """Quantize the pool's `table` blocks into staging `blocks` (same count, in order), a few
        blocks at a time (the float copies stay small), and wait for the device before returning:
        a peer reads the staging memory as soon as it learns of it."""
        device = pool.data.device
        for at in range(0, len(table), CHUNK_BLOCKS):
            src = torch.tensor(table[at : at + CHUNK_BLOCKS], dtype=torch.long, device=device)
            dst = torch.tensor(blocks[at : at + CHUNK_BLOCKS], dtype=torch.long, device=device)
            source = pool.data.index_select(0, src).float()
            scale = source.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / QMAX
            quantized = torch.round(source / scale).clamp_(-QMAX, QMAX).to(torch.int8)
            n = len(src)
            packed = torch.cat(
                [quantized.reshape(n, -1).view(torch.uint8), scale.reshape(n, -1).view(torch.uint8)], 1
            )
            self.data.index_copy_(0, dst, packed)
        _settle(device)

    def unpack(self, pool: KVPool, table: list[int], blocks: list[int]) -> None:
        """Dequantize staging `blocks` into the pool's `table` blocks (same count, in order), and wait
        for the device before returning: the staging blocks are free for another pull after it."""
        device = pool.data.device
        for at in range(0, len(table), CHUNK_BLOCKS):
            src = torch.tensor(blocks[at : at + CHUNK_BLOCKS], dtype=torch.long, device=device)
            dst = torch.tensor(table[at : at + CHUNK_BLOCKS], dtype=torch.long, device=device)
            n = len(src)
            packed = self.data.index_select(0, src)
            quantized = packed[:, : self.values].contiguous().view(torch.int8).reshape(n, *self.block_shape)
            scale = (
                packed[:, self.values :]
                .contiguous()
                .view(torch.float32)
                .reshape(n, *self.block_shape[:-1], 1)
            )
            pool.data.index_copy_(0, dst, (quantized.float() * scale).to(pool.data.dtype))
        _settle(device)


class StagedCopy:
    """Staging blocks a thread other than the engine's is writing: a lease that ends meanwhile (a
    cancelled request) frees them only when the write is over, so no other request can be handed
    blocks still being written."""

    def __init__(self, staging: KVStaging, blocks: list[int]) -> None:
        self.staging, self.blocks = staging, blocks
        self._lock = threading.Lock()
        self._writing, self._released = True, False

    def release(self) -> None:
        with self._lock:
            self._released = True
            if self._writing:
                return
        self.staging.free(self.blocks)

    def written(self) -> None:
        with self._lock:
            self._writing = False
            if not self._released:
                return
        self.staging.free(self.blocks)


def _settle(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
