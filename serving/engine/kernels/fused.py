"""The decoder layer's fused element-wise steps (`fused_ops.c`) as torch calls: residual add + RMSNorm,
rotary embedding in place, SiLU-gated product, the write of new keys and values into the pool.

Float32 and bfloat16 (rounded to bfloat16 after each step, where the torch ops round). Each returns
None (or False) when it cannot run here -- kernels off or unbuilt, another dtype or not on the CPU,
a layout it does not take, several intra-op threads on a large input (the C loops are single-threaded,
torch's ops are not) -- and the caller then runs its torch ops, which compute the same thing.
"""

from __future__ import annotations

import torch

from serving.engine.kernels import load

# Above this many rows with more than one intra-op thread, torch's parallel ops beat one C loop.
_SERIAL_ROWS = 64


def _usable(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    for t in tensors:
        if t.dtype != dtype or t.device.type != "cpu":
            return False
    rows = tensors[0].shape[0] if tensors[0].dim() > 1 else 1
    return rows <= _SERIAL_ROWS or torch.get_num_threads() == 1


def add_rms_norm(
    x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x + h, RMSNorm(x + h)) for (rows, dim) x and h; with h None, (x, RMSNorm(x)). None when the
    kernel cannot run: the caller adds and normalises with torch."""
    operands = (x, weight) if h is None else (x, h, weight)
    if x.dim() != 2 or not _usable(*operands) or not all(t.is_contiguous() for t in operands):
        return None
    lib = load("fused_ops")
    if lib is None:
        return None
    rows, dim = x.shape
    total = x if h is None else torch.empty_like(x)
    out = torch.empty_like(x)
    fn = lib.epd_add_rms_norm if x.dtype == torch.float32 else lib.epd_add_rms_norm_bf16
    fn(
        x.data_ptr(),
        None if h is None else h.data_ptr(),
        total.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        rows,
        dim,
        eps,
    )
    return total, out


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x (rows, heads, dim) -- rows may be strided, each row's heads contiguous -- turned in place by
    cos, sin (rows, dim); False (x untouched) when the kernel cannot run."""
    if x.dim() != 3 or not _usable(x, cos, sin) or x.shape[2] % 2:
        return False
    rows, heads, dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != dim or not (cos.is_contiguous() and sin.is_contiguous()):
        return False
    if cos.numel() != rows * dim or sin.numel() != rows * dim:
        return False
    lib = load("fused_ops")
    if lib is None:
        return False
    fn = lib.epd_rotary if x.dtype == torch.float32 else lib.epd_rotary_bf16
    fn(x.data_ptr(), x.stride(0), rows, heads, dim, cos.data_ptr(), sin.data_ptr())
    return True


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up where gate_up (rows, 2 * hidden) holds them side by side; None when the kernel
    cannot run."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or not gate_up.is_contiguous() or not _usable(gate_up):
        return None
    lib = load("fused_ops")
    if lib is None:
        return None
    rows, hidden = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, hidden)
    fn = lib.epd_silu_mul if gate_up.dtype == torch.float32 else lib.epd_silu_mul_bf16
    fn(gate_up.data_ptr(), out.data_ptr(), rows, hidden)
    return out


def write_kv(
    k: torch.Tensor, v: torch.Tensor, layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor
) -> bool:
    """k, v (rows, kv heads, dim) -- rows may be strided -- into slot offsets[r] of block blocks[r] of
    `layer` (num_blocks, 2, block_size, kv heads, dim); False (nothing written) when the kernel cannot
    run. One copy per row instead of two indexed assignments' bookkeeping."""
    if k.device.type != "cpu" or layer.device.type != "cpu" or not (k.dtype == v.dtype == layer.dtype):
        return False
    row = k.shape[1] * k.shape[2]
    for t in (k, v):
        if t.dim() != 3 or t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            return False
    if layer.stride(4) != 1 or layer.stride(3) != layer.shape[4] or layer.shape[3] * layer.shape[4] != row:
        return False
    if blocks.dtype != torch.long or offsets.dtype != torch.long or blocks.numel() != k.shape[0]:
        return False
    lib = load("fused_ops")
    if lib is None:
        return False
    size = layer.element_size()
    lib.epd_write_kv(
        k.data_ptr(),
        v.data_ptr(),
        k.stride(0) * size,
        v.stride(0) * size,
        k.shape[0],
        row * size,
        layer.data_ptr(),
        layer.stride(0) * size,
        layer.stride(1) * size,
        layer.stride(2) * size,
        blocks.data_ptr(),
        offsets.data_ptr(),
    )
    return True
