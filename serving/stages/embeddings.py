"""Embedding memory of a worker: a registered slot buffer that embeddings are sent from and received
into, and the encode stage's cache keyed by image content."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np
import torch

from serving.engine.kv_cache import BlockAllocator
from serving.transport.base import merge_regions
from serving.types import Region


class EmbeddingBuffer:
    """Pre-allocated (slots, slot_tokens, hidden) memory, registered with the transport once.
    A request's packed embeddings take the lowest free slots; its rows are byte ranges of them."""

    def __init__(
        self, num_slots: int, slot_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.slot_tokens = slot_tokens
        self.data = torch.zeros(num_slots, slot_tokens, hidden, dtype=dtype, device=device)
        self._slots = BlockAllocator(num_slots)

    @property
    def num_free(self) -> int:
        return self._slots.num_free

    def slots_for(self, rows: int) -> int:
        return -(-rows // self.slot_tokens)

    def allocate(self, rows: int) -> list[int]:
        return self._slots.allocate(self.slots_for(rows))

    def free(self, slots: list[int]) -> None:
        self._slots.free(slots)

    def write(self, slots: list[int], packed: torch.Tensor) -> None:
        for i, chunk in enumerate(packed.split(self.slot_tokens)):
            self.data[slots[i], : chunk.shape[0]] = chunk

    def read(self, slots: list[int], rows: int) -> torch.Tensor:
        flat = self.data[torch.tensor(slots, device=self.data.device)].flatten(0, 1)
        return flat[:rows].clone()

    def regions(self, slots: list[int], rows: int) -> list[Region]:
        """Byte ranges holding the first `rows` rows of these slots, in order."""
        row_bytes = self.data.shape[2] * self.data.element_size()
        slot_bytes = self.slot_tokens * row_bytes
        spans = [(slot * slot_bytes, min(rows - i * self.slot_tokens, self.slot_tokens) * row_bytes)
                 for i, slot in enumerate(slots)]  # fmt: skip
        return merge_regions(spans)


def image_key(pixels: np.ndarray) -> str:
    """Content hash over the decoded pixels and their shape: equal images share it, one changed pixel
    does not."""
    digest = hashlib.sha256()
    digest.update(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    """LRU of visual embeddings, bounded in bytes, with hit and miss counters. Safe to use from any
    thread: a request looks its media up from its own thread, without waiting for the engine thread's
    next pass (a whole engine step under load)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            if size > self.max_bytes or key in self._entries:
                return
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
