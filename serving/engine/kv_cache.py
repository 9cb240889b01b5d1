"""Paged KV cache: a pool of fixed-size blocks, per-request block tables, export and import of blocks.

Layout is block-major, `(num_blocks, layers, 2, block_size, kv_heads, head_dim)`: one block holds every
layer's keys and values for `block_size` tokens in one contiguous region. A request's KV is therefore
its blocks, and consecutive block ids form one region a transport can move in a single descriptor.
The allocator hands out the lowest free ids so a request's blocks tend to be consecutive.

Automatic prefix caching (vLLM's): a full block of a prompt is named by a hash chained over its tokens
(and the images its pads stand for) and every block before it, so equal hashes mean equal whole
prefixes. Blocks are reference counted; a freed block whose hash is known stays in an LRU of
cached-but-free blocks (counted as free) until the allocator needs a block and evicts it. A new request
takes references to its longest cached prefix and prefills only the rest. Shared blocks are full and
never written again: a request writes only at positions past its cached prefix, in its own blocks.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serving.engine.allocator import zeros_huge


class OutOfBlocks(RuntimeError):
    """The pool cannot hold what was asked; the scheduler checks capacity first, so this is a bug."""


@dataclass
class KVExport:
    """A request's KV in transportable form: its blocks stacked into one contiguous tensor."""

    data: torch.Tensor  # (n_blocks, layers, 2, block_size, kv_heads, head_dim)
    num_tokens: int


class BlockAllocator:
    """Fixed-size blocks by id with reference counts, and the prefix cache's hash ↔ block maps.

    A free block is either uncached (a min-heap: lowest id first, so what one request takes tends to be
    contiguous) or cached (its hash still names it: an LRU, oldest evicted first). Allocation takes
    uncached blocks first and evicts cached ones only when none is left, so a cache hit survives as
    long as the pool has room for it."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))
        heapq.heapify(self._free)
        self._refs = [0] * num_blocks
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # refcount 0, hash known; LRU first
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks a request can get: never-used and cached-but-free ones alike."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_cached(self) -> int:
        """Blocks the prefix cache names (in use or free)."""
        return len(self._hash_of)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfBlocks(f"asked for {n} blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                block = heapq.heappop(self._free)
            else:
                block, _ = self._cached_free.popitem(last=False)
                self._forget(block)
                self.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block nobody holds becomes free (cached when its hash is
        known, appended in the order given: callers pass a table tail first, so a prefix outlives its
        tail). Every block must be held: a double free is a bug and raises before anything changes."""
        for block, count in Counter(blocks).items():
            if self._refs[block] < count:
                raise RuntimeError(f"block {block} freed more often than it is held")
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._hash_of:
                self._cached_free[block] = None
            else:
                heapq.heappush(self._free, block)

    # -- the prefix cache -------------------------------------------------------------------------

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest cached prefix of `hashes` (no references are taken)."""
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_in_use(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` someone holds: sharing those costs no free block."""
        return sum(1 for b in blocks if self._refs[b])

    def share(self, blocks: Sequence[int]) -> None:
        """Take a reference to each cached block (a prefix hit); a free one leaves the LRU."""
        for block in blocks:
            if block not in self._hash_of:
                raise RuntimeError(f"block {block} is not in the prefix cache")
            if not self._refs[block]:
                del self._cached_free[block]
            self._refs[block] += 1

    def register(self, block: int, block_hash: bytes) -> bool:
        """Name a held, fully computed block by its hash. A hash already naming another block (the same
        prefix computed twice at once) is kept as is: this block stays private and is not cached."""
        if not self._refs[block]:
            raise RuntimeError(f"block {block} is free; only a held block can be registered")
        if block_hash in self._block_of or block in self._hash_of:
            return False
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block
        return True

    def reset_cache(self) -> None:
        """Forget every hash: cached free blocks become plain free ones, held blocks stay held."""
        for block in self._cached_free:
            heapq.heappush(self._free, block)
        self._cached_free.clear()
        self._hash_of.clear()
        self._block_of.clear()

    def _forget(self, block: int) -> None:
        del self._block_of[self._hash_of.pop(block)]


def prompt_block_hashes(
    token_ids: list[int],
    block_size: int,
    pad_ids: int | tuple[int, ...],
    images: Sequence[tuple[bytes, int]] | None,
) -> list[bytes]:
    """The prefix-cache hash of each full block of a prompt, each chained over the one before it.

    `images` are (content key, pad rows) per image or video in prompt order, and `pad_ids` the tokens
    that stand for them. Every item's pads have the same token id, so a block with pads also hashes the
    key (and row offset) of each item those pads stand for: two different images never share a block,
    the same image twice does. With `images` None (their content unknown) hashing stops before the
    first block holding a pad."""
    pad_set = {pad_ids} if isinstance(pad_ids, int) else set(pad_ids)
    spans: list[tuple[bytes, int, int]] = []  # (key, first pad row, end pad row) over the prompt
    row = 0
    for key, rows in images or ():
        spans.append((key, row, row + rows))
        row += rows
    hashes: list[bytes] = []
    parent = b""
    pads = 0  # pad rows before the current block
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start : start + block_size]
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(array("q", block).tobytes())
        n_pad = sum(1 for t in block if t in pad_set)
        if n_pad:
            covering = [(key, first) for key, first, end in spans if first < pads + n_pad and end > pads]
            if images is None or not covering or pads + n_pad > row:
                break  # unknown (or inconsistent) image content: nothing from here on is cacheable
            for key, first in covering:
                h.update(key)
                h.update(array("q", [pads - first]).tobytes())
            pads += n_pad
        parent = h.digest()
        hashes.append(parent)
    return hashes


def content_key(tensor: torch.Tensor, *extra: int) -> bytes:
    """A content hash of a tensor (its dtype, shape and bytes) and some integers: an image's identity."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}{tuple(t.shape)}{extra}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


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
        self.data = zeros_huge(
            num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self._blocks = BlockAllocator(num_blocks)

    # -- allocation -----------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return self._blocks.num_free

    @property
    def usage(self) -> float:
        """Share of blocks in use, 0..1 (vLLM's kv_cache_usage_perc); cached free blocks are free."""
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
        """Drop the table's references and empty it (so a second free of the same table is a no-op).
        Tail first: the LRU then evicts a prompt's last blocks before its first ones."""
        self._blocks.free(block_table[::-1])
        block_table.clear()

    # -- the prefix cache -------------------------------------------------------------------------

    def lookup_prefix(self, hashes: list[bytes]) -> list[int]:
        return self._blocks.lookup(hashes)

    def num_in_use(self, blocks: list[int]) -> int:
        return self._blocks.num_in_use(blocks)

    def share(self, blocks: list[int]) -> None:
        self._blocks.share(blocks)

    def register(self, block: int, block_hash: bytes) -> bool:
        return self._blocks.register(block, block_hash)

    def reset_prefix_cache(self) -> None:
        self._blocks.reset_cache()

    @property
    def num_cached_blocks(self) -> int:
        return self._blocks.num_cached

    @property
    def num_evictions(self) -> int:
        return self._blocks.evictions

    def refcount(self, block: int) -> int:
        return self._blocks.refcount(block)

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
        """Copy exported blocks into freshly allocated blocks of this pool; returns their table.
        Imported blocks are private (never registered in the prefix cache): their hashes are not known
        here, and freeing them returns them to the plain free list."""
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
