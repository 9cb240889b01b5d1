"""Linears over a few rows (`small_linear.c`): one pass over weights packed in groups of 64 columns.

Decode steps multiply a handful of rows by every weight of the model, so their linears are a read of
the weights; oneDNN's packed matmul ran them at 11-17 GB/s here, the C kernel's single sequential
stream at twice that (see `cpu_linear` for the numbers). `pack` lays a weight out for it once, at load;
`linear` runs it, or returns None where it cannot (kernels off or unbuilt, another dtype or device).
"""

from __future__ import annotations

import torch

from serving.engine.kernels import load

GROUP = 64  # output columns per group: four 16-float vectors, the kernel's accumulators per row


def supported(weight: torch.Tensor) -> bool:
    """Whether the kernel runs linears of this weight's dtype and device here (it is built for
    AVX-512, and AVX512-BF16 for bfloat16)."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    lib = load("small_linear")
    return lib is not None and bool(lib.epd_small_linear_supports(weight.dtype == torch.bfloat16))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) weight -> groups of 64 output columns, k-major: float32 (G, K, 64) holding w[64g + c, k]
    at [g, k, c]; bfloat16 (G, ceil(K / 2), 64, 2) holding it at [g, k // 2, c, k % 2]. Zero past N and
    past K."""
    n, k = weight.shape
    groups = -(-n // GROUP)
    if weight.dtype == torch.float32:
        padded = weight.new_zeros(groups * GROUP, k)
        padded[:n] = weight
        return padded.view(groups, GROUP, k).transpose(1, 2).contiguous()
    pairs = -(-k // 2)
    padded = weight.new_zeros(groups * GROUP, 2 * pairs)
    padded[:n, :k] = weight
    return padded.view(groups, GROUP, pairs, 2).permute(0, 2, 1, 3).contiguous()


def linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor | None:
    """x (M, K) @ weight.T + bias with `packed` from `pack(weight)`, in x's dtype (the weight's), or
    None when the kernel cannot run here."""
    lib = load("small_linear")
    if lib is None or x.dim() != 2 or x.dtype != packed.dtype or x.device.type != "cpu":
        return None
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        return None
    if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
        x = x.contiguous()
    rows, k = x.shape
    y = x.new_empty(rows, out_features)
    lib.epd_small_linear(
        x.data_ptr(),
        x.stride(0),
        packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        out_features,
        rows,
        k,
        out_features,
        x.dtype == torch.bfloat16,
    )
    return y
