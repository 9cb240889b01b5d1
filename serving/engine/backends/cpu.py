"""The CPU backend: attention through the C kernels (`serving.engine.kernels`), over the blocks in place.

- **Decode tokens** go to a kernel that reads each sequence's blocks where they lie in the pool: no
  copy of the context, the heads that share a KV head read each key once, and nothing is padded.
- **Prompt tokens** go to a second kernel: causal flash attention over the same blocks in place, the
  mask aligned to each sequence's end (a chunk after cached tokens sees them and itself causally), key
  tiles past a query tile skipped rather than masked.

A group a kernel cannot take (no C compiler, `EPD_CPU_KERNELS=0`, a dtype it does not read) runs the
batched torch path instead (`torch_sdpa`): the kernels are a speed-up, never a requirement.
"""

from __future__ import annotations

import math

import torch

from serving.engine import kernels
from serving.engine.attention import AttentionBatch, _Group
from serving.engine.backends import AttentionBackend, write_kv
from serving.engine.backends.pointwise import CpuPointwise, Pointwise
from serving.engine.backends.torch_sdpa import attend_padded
from serving.engine.kernels import fused


class CpuBackend(AttentionBackend):
    name = "cpu"

    def pointwise(self) -> Pointwise:
        return CpuPointwise()

    def prepare(self, model: torch.nn.Module) -> None:
        """The layers' element-wise steps through the C kernels (`CpuPointwise`), every linear packed
        for oneDNN (the decoder's and the LM head's with the few-row kernel's copy too), and a
        decode-only step's layers bound as one C call (it attends with this backend's decode kernel,
        so it runs under this backend only)."""
        from serving.engine.models.cpu_linear import pack_linears
        from serving.engine.models.decode_layers import DecodeLayers

        super().prepare(model)
        pack_linears(model, few_rows=(model.model, model.lm_head))
        model.model.decode_layers = DecodeLayers.build(model.model)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        if not fused.write_kv(k, v, kv_cache, batch.slot_blocks, batch.slot_offsets):
            write_kv(k, v, kv_cache, batch)
        heads, dim = q.shape[1], q.shape[2]
        out = q.new_empty(q.shape[0], heads * dim)
        if batch.decode is not None and not _decode_kernel(q, kv_cache, batch.decode, out):
            attend_padded(q, kv_cache, batch.decode, batch.block_size, out)
        if batch.prompt is not None and not _prefill_kernel(q, kv_cache, batch.prompt, out):
            attend_padded(q, kv_cache, batch.prompt, batch.block_size, out)
        return out


def _decode_kernel(q: torch.Tensor, kv_cache: torch.Tensor, group: _Group, out: torch.Tensor) -> bool:
    """The decode group through the C kernel; False when it cannot run here."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        return False
    queries = q if group.rows is None else q.index_select(0, group.rows)
    # A batch of decode tokens only, in float32: the kernel writes the output rows where they go.
    direct = group.rows is None and out.dtype == torch.float32
    result = kernels.paged_decode(
        queries.to(torch.float32).contiguous(),
        kv_cache,
        group.block_index,
        group.block_starts,
        group.ctx,
        1.0 / math.sqrt(q.shape[2]),
        out=out.view(q.shape) if direct else None,
    )
    if result is None:
        return False
    if not direct:
        _store_rows(out, group.rows, result.view(result.shape[0], -1))
    return True


def _store_rows(out: torch.Tensor, rows: torch.Tensor | None, flat: torch.Tensor) -> None:
    """A kernel's float32 output for a group's rows (all of them when rows is None) into `out`."""
    if rows is None:
        out.copy_(flat)
    else:
        out.index_copy_(0, rows, flat.to(out.dtype))


def _prefill_kernel(q: torch.Tensor, kv_cache: torch.Tensor, group: _Group, out: torch.Tensor) -> bool:
    """The prompt group through the C kernel; False when it cannot run here."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        return False
    # The kernel reads and writes only the group's rows, so the whole batch goes in as it is; in
    # float32 the output rows land where they go.
    direct = q.dtype == torch.float32
    target = out.view(q.shape) if direct else torch.empty(q.shape, dtype=torch.float32)
    if not kernels.paged_prefill(
        q.to(torch.float32).contiguous(),
        kv_cache,
        group.block_index,
        group.block_starts,
        group.ctx,
        group.first_rows,
        group.row_counts,
        1.0 / math.sqrt(q.shape[2]),
        target,
    ):
        return False
    if not direct:
        flat = target.view(q.shape[0], -1)
        _store_rows(out, group.rows, flat if group.rows is None else flat.index_select(0, group.rows))
    return True
