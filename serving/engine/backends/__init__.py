"""Attention backends: how one step's packed, paged attention runs on the device it runs on.

A step is planned once (`plan`: the step's `AttentionBatch` — each sequence's used blocks and each new
token's slot, as tensors on the device; a backend that needs its own layout, padded tables and masks
or Triton tiles, makes it at the step's first layer and every other layer reuses it) and each layer
then calls `forward(q, k, v, kv_cache, batch)`, which writes the step's new keys and values into the
layer's pool blocks and returns the attention output. The model
code calls this interface and nothing else; which backend runs is chosen per device:

- `cpu`: the C kernels (decode and prefill attention over the blocks in place), with the batched torch
  path for what a kernel does not take (no compiler, another dtype); at load (`prepare`) it also packs
  the linears and binds the one-call decode step;
- `triton`: one Triton kernel launch per layer for the whole mixed prefill/decode batch (CUDA);
- `torch`: one `scaled_dot_product_attention` call per layer and kind of token (decode, prompt) over the
  step's contexts gathered and padded: any device, no compiled code.

`EPD_ATTENTION_BACKEND` (cpu, triton, torch) overrides the choice, for tests and for comparison.

A compiled backend other than the CPU's is checked once when a worker starts (`checked`): a small
mixed batch of the model's shapes through it and through `torch`. A kernel that fails to compile for
this device, or answers differently, would otherwise fail every request the worker serves; instead
the worker runs on `torch` and logs why.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serving.engine.attention import AttentionBatch

NAMES = ("cpu", "triton", "torch")

log = logging.getLogger(__name__)


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

    def prepare(self, model: torch.nn.Module) -> None:
        """Once, after the weights load: what this backend runs besides attention (nothing here; the
        CPU's packs the linears and binds the one-call decode step)."""
        return None

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


def checked(
    backend: AttentionBackend,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[AttentionBackend, str | None]:
    """`backend`, or the `torch` backend and the reason when `backend` raises or disagrees with it on a
    small mixed step of these shapes: a decode token after two blocks and more, a chunk after cached
    tokens and a whole prompt, in scattered blocks. Backends other than `triton` pass
    as they are (the CPU's kernels have their own fallback; `torch` is the reference)."""
    if backend.name != "triton":
        return backend, None
    from serving.engine.backends.torch_sdpa import TorchBackend

    reference = TorchBackend()
    gen = torch.Generator().manual_seed(0)
    q_lens, ctx_lens = [1, 3, 5], [2 * block_size + 2, block_size + 3, 5]
    blocks = [-(-n // block_size) for n in ctx_lens]
    order = torch.randperm(sum(blocks) + 2, generator=gen).tolist()
    tables = [order[sum(blocks[:i]) : sum(blocks[: i + 1])] for i in range(len(blocks))]
    total = sum(q_lens)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    pool = rand(len(order), 2, block_size, kv_heads, head_dim)
    q, k, v = rand(total, heads, head_dim), rand(total, kv_heads, head_dim), rand(total, kv_heads, head_dim)

    def run(b: AttentionBackend) -> torch.Tensor:
        return b.forward(q, k, v, pool.clone(), b.plan(q_lens, ctx_lens, tables, block_size, device))

    expected = run(reference)
    try:
        got = run(backend)
        error = (got.float() - expected.float()).abs().max().item()
    except Exception as exc:  # noqa: BLE001 - whatever stops the kernel here stops it for every request
        reason = f"the {backend.name} attention kernel failed on this device ({type(exc).__name__}: {exc})"
    else:
        # Room for TF32 matmuls in float32 and for half types' rounding; a wrong block, mask or
        # softmax is off by tenths on these random inputs.
        tolerance = 2e-2 if dtype == torch.float32 else 6e-2
        if error <= tolerance:
            return backend, None
        reason = f"the {backend.name} attention kernel differs from torch's by {error:.3g} on this device"
    log.warning("%s; attention runs on the torch backend", reason)
    return reference, reason
