"""Attention backends: how one step's packed, paged attention runs on the device it runs on.

A step is planned once (`plan`: the step's `AttentionBatch` — each sequence's used blocks and each new
token's slot, as tensors on the device; a backend that needs its own layout, padded tables and masks
or Triton tiles, makes it at the step's first layer and every other layer reuses it) and each layer
then calls `forward(q, k, v, kv_cache, batch)`, which writes the step's new keys and values into the
layer's pool blocks and returns the attention output. The model
code calls this interface and nothing else; which backend runs is chosen per device:

- `cpu`: the C kernels (decode and prefill attention over the blocks in place), with the batched torch
  path for what a kernel does not take (no compiler, another dtype);
- `triton`: one Triton kernel launch per layer for the whole mixed prefill/decode batch (CUDA);
- `torch`: one `scaled_dot_product_attention` call per layer and kind of token (decode, prompt) over the
  step's contexts gathered and padded: any device, no compiled code.

`EPD_ATTENTION_BACKEND` (cpu, triton, torch) overrides the choice, for tests and for comparison.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serving.engine.attention import AttentionBatch

NAMES = ("cpu", "triton", "torch")


class AttentionBackend(ABC):
    name: str

    def plan(
        self,
        q_lens: list[int],
        ctx_lens: list[int],
        tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionBatch:
        """The step's metadata: built once, read by every layer. Sequence i feeds q_lens[i] new tokens,
        the last of its ctx_lens[i]; tables[i] are its pool blocks in order."""
        from serving.engine.attention import AttentionBatch

        batch = AttentionBatch.build(q_lens, ctx_lens, tables, block_size, device)
        batch.backend = self
        return batch

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """q (T, H, D), k/v (T, KV, D) packed in the plan's row order; kv_cache one layer of the pool,
        `(num_blocks, 2, block_size, KV, D)`. Returns (T, H * D)."""


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch) -> None:
    """The step's new keys and values into their slots (one indexed write each, on any device)."""
    kv_cache[batch.slot_blocks, 0, batch.slot_offsets] = k
    kv_cache[batch.slot_blocks, 1, batch.slot_offsets] = v


def backend_for(device: torch.device) -> AttentionBackend:
    """The backend for a worker on `device` (see the module doc)."""
    name = os.environ.get("EPD_ATTENTION_BACKEND") or _default(device)
    if name not in NAMES:
        raise ValueError(f"EPD_ATTENTION_BACKEND must be one of {', '.join(NAMES)}, not {name!r}")
    if name == "cpu":
        from serving.engine.backends.cpu import CpuBackend

        return CpuBackend()
    if name == "triton":
        from serving.engine.backends.triton_paged import TritonBackend

        return TritonBackend()
    from serving.engine.backends.torch_sdpa import TorchBackend

    return TorchBackend()


def _default(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        from serving.engine.backends.triton_paged import available

        return "triton" if available() else "torch"
    return "torch"
