"""Attention backends: how one step's packed, paged attention runs on the device it runs on.

A step is planned once (`plan`: the step's `AttentionBatch` — each sequence's used blocks and each new
token's slot, as tensors on the device; a backend that needs its own layout, padded tables and masks
or Triton tiles, makes it at the step's first layer and every other layer reuses it) and each layer
then calls `forward(q, k, v, kv_cache, batch)`, which writes the step's new keys and values into the
layer's pool blocks and returns the attention output. The model
code calls this interface and nothing else; which backend runs is chosen per device:

- `cpu`: the C kernels (decode and prefill attention over the blocks in place), with the batched torch
  path for what a kernel does not take (no compiler, another dtype); at load (`prepare`) it also packs
  the linears, binds its element-wise kernels into the layers (`pointwise`) and the one-call decode
  step;
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
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from serving.engine.backends.pointwise import TORCH, Pointwise, bind

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

    def pointwise(self) -> Pointwise:
        """The layers' element-wise steps as this backend runs them (torch's ops here)."""
        return TORCH

    def prepare(self, model: torch.nn.Module) -> None:
        """Once, after the weights load: what this backend runs besides attention. Here the layers'
        element-wise steps (`pointwise`); the CPU's also packs the linears and binds the one-call
        decode step."""
        bind(model, self.pointwise())

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
    """`backend`, or the `torch` backend and the reason when its kernels raise or disagree with torch's
    on small inputs of these shapes: attention on a mixed step (a decode token after two blocks and
    more, a chunk after cached tokens and a whole prompt, in scattered blocks), and the element-wise
    steps (add and norm, the rotary embedding of a fused QKV row, the gated product). Backends other
    than `triton` pass as they are (the CPU's kernels have their own fallback; `torch` is the
    reference)."""
    if backend.name != "triton":
        return backend, None
    from serving.engine.backends.torch_sdpa import TorchBackend

    reference = TorchBackend()
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    # Room for TF32 matmuls in float32 and for half types' rounding; a wrong block, mask, softmax or
    # element is off by tenths on these random inputs.
    tolerance = 2e-2 if dtype == torch.float32 else 6e-2
    checks: list[tuple[str, Callable[[], float]]] = [
        (
            "attention",
            lambda: _attention_error(backend, reference, heads, kv_heads, head_dim, block_size, rand),
        ),
        (
            "element-wise steps",
            lambda: _pointwise_error(backend.pointwise(), heads, kv_heads, head_dim, rand),
        ),
    ]
    for part, check in checks:
        try:
            error = check()
        except Exception as exc:  # noqa: BLE001 - whatever stops a kernel here stops it for every request
            failure = f"{type(exc).__name__}: {exc}"
            reason = f"the {backend.name} backend ({part}) failed on this device ({failure})"
            break
        if error > tolerance:
            reason = f"the {backend.name} backend ({part}) differs from torch's by {error:.3g} on this device"
            break
    else:
        return backend, None
    log.warning("%s; the worker runs on the torch backend", reason)
    return reference, reason


def _attention_error(
    backend: AttentionBackend,
    reference: AttentionBackend,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    rand: Callable[..., torch.Tensor],
) -> float:
    q_lens, ctx_lens = [1, 3, 5], [2 * block_size + 2, block_size + 3, 5]
    blocks = [-(-n // block_size) for n in ctx_lens]
    order = torch.randperm(sum(blocks) + 2, generator=torch.Generator().manual_seed(1)).tolist()
    tables = [order[sum(blocks[:i]) : sum(blocks[: i + 1])] for i in range(len(blocks))]
    total = sum(q_lens)
    pool = rand(len(order), 2, block_size, kv_heads, head_dim)
    q, k, v = rand(total, heads, head_dim), rand(total, kv_heads, head_dim), rand(total, kv_heads, head_dim)
    device = pool.device

    def run(b: AttentionBackend) -> torch.Tensor:
        return b.forward(q, k, v, pool.clone(), b.plan(q_lens, ctx_lens, tables, block_size, device))

    expected = run(reference)
    return (run(backend).float() - expected.float()).abs().max().item()


def _pointwise_error(
    pointwise: Pointwise, heads: int, kv_heads: int, head_dim: int, rand: Callable[..., torch.Tensor]
) -> float:
    rows, width = 3, heads * head_dim
    x, h, weight = rand(rows, width), rand(rows, width), rand(width)
    qkv = rand(rows, (heads + 2 * kv_heads) * head_dim)
    cos, sin = rand(rows, 1, head_dim), rand(rows, 1, head_dim)
    gate_up = rand(rows, 2 * width)

    def run(ops: Pointwise) -> list[torch.Tensor]:
        turned = qkv.clone()[:, : (heads + kv_heads) * head_dim].view(rows, heads + kv_heads, head_dim)
        return [
            *ops.add_rms_norm(x, h, weight, 1e-6),
            ops.add_rms_norm(x, None, weight, 1e-6)[1],
            ops.rotary(turned, cos, sin),
            ops.silu_mul(gate_up),
        ]

    return max(
        (got.float() - want.float()).abs().max().item()
        for got, want in zip(run(pointwise), run(TORCH), strict=True)
    )
