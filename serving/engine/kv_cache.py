"""Paged KV cache: a pool of fixed-size blocks, per-request block tables, export and import of blocks.

Layout is block-major, `(num_blocks, layers, 2, block_size, kv_heads, head_dim)`: one block holds every
layer's keys and values for `block_size` tokens in one contiguous region. A request's KV is therefore
its blocks, and consecutive block ids form one region a transport can move in a single descriptor.
The allocator hands out the lowest free ids so a request's blocks tend to be consecutive.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


class OutOfBlocks(RuntimeError):
    """The pool cannot hold what was asked; the scheduler checks capacity first, so this is a bug."""


@dataclass
class KVExport:
    """A request's KV in transportable form: its blocks stacked into one contiguous tensor."""

    data: torch.Tensor  # (n_blocks, layers, 2, block_size, kv_heads, head_dim)
    num_tokens: int


class BlockAllocator:
    """Fixed-size blocks by id, lowest free id first, so what one request takes tends to be contiguous."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))
        heapq.heapify(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            heapq.heappush(self._free, block)


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        # zeros() writes every page now: later writes into touched memory are ~30x faster, and a
        # transport registers this memory once.
        self.data = torch.zeros(
            num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self._blocks = BlockAllocator(num_blocks)

    # -- allocation -----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return self._blocks.num_free

    @property
    def usage(self) -> float:
        """Share of blocks in use, 0..1 (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self._blocks.num_free / self.num_blocks

    @property
    def block_nbytes(self) -> int:
        return self.data[0].numel() * self.data.element_size()

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        return self._blocks.allocate(n)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend a block table in place until it holds `num_tokens` tokens."""
        missing = self.blocks_for(num_tokens) - len(block_table)
        if missing > 0:
            block_table.extend(self.allocate(missing))

    def free(self, block_table: list[int]) -> None:
        self._blocks.free(block_table)
        block_table.clear()

    def regions(self, block_table: list[int]) -> list[tuple[int, int]]:
        """The byte ranges of a request's blocks inside `data`, consecutive blocks fused."""
        size = self.block_nbytes
        return [(first * size, count * size) for first, count in block_regions(block_table)]

    # -- access for attention -------------------------------------------------------------------

    def layer(self, index: int) -> torch.Tensor:
        """A view of one layer's keys and values, `(num_blocks, 2, block_size, kv_heads, head_dim)`: a
        block's keys and values of one layer lie together, so attention reads both in one pass."""
        return self.data[:, index]

    # -- moving blocks between pools ------------------------------------------------------------

    def export_blocks(self, block_table: list[int], num_tokens: int) -> KVExport:
        index = torch.tensor(block_table, dtype=torch.long, device=self.data.device)
        return KVExport(self.data.index_select(0, index), num_tokens)

    def import_blocks(self, kv: KVExport) -> list[int]:
        """Copy exported blocks into freshly allocated blocks of this pool; returns their table."""
        table = self.allocate(kv.data.shape[0])
        self.import_into(table, kv)
        return table

    def import_into(self, block_table: list[int], kv: KVExport) -> None:
        index = torch.tensor(block_table[: kv.data.shape[0]], dtype=torch.long, device=self.data.device)
        self.data.index_copy_(0, index, kv.data.to(self.data.device, self.data.dtype))


def block_regions(block_table: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive block ids as (first block, count): one contiguous memory region each."""
    runs: list[tuple[int, int]] = []
    for block in block_table:
        if runs and runs[-1][0] + runs[-1][1] == block:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block, 1))
    return runs
