"""Linears over a few rows (`small_linear.c`): one pass over weights packed in groups of 64 columns.

Decode steps multiply a handful of rows by every weight of the model, so their linears are a read of
the weights; oneDNN's packed matmul ran them at 11-17 GB/s here, the C kernel's single sequential
stream at twice that (see `cpu_linear` for the numbers). `FewRows` packs a weight for it once, at load,
and runs it (`supported` says first whether it runs here: kernels on and built, float32 on AVX-512,
bfloat16 on AVX512-BF16).
"""

from __future__ import annotations

import torch

from serving.engine.kernels import load

GROUP = 64  # output columns per group: four 16-float vectors, the kernel's accumulators per row


def parallel() -> bool:
    """Whether the kernel splits a call across torch's intra-op threads (built with OpenMP); if not,
    callers with several threads keep their oneDNN matmul."""
    lib = load("small_linear")
    return lib is not None and bool(lib.epd_small_linear_parallel())


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


class FewRows:
    """One weight packed for the kernel, with what every call passes it bound once: a decode step
    makes a few dozen of these calls, and each argument looked up per call costs what the kernel
    takes for a small matrix."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = pack(weight)
        self.bias = None if bias is None else bias.detach().to(weight.dtype).contiguous()
        lib = load("small_linear")
        if lib is None:
            raise RuntimeError("the few-row linear kernel is not available here: check supported() first")
        self._fn = lib.epd_small_linear
        self._weight = self.packed.data_ptr()
        self._bias = None if self.bias is None else self.bias.data_ptr()
        self._bf16 = int(weight.dtype == torch.bfloat16)

    def __call__(self, x: torch.Tensor, threads: int = 1) -> torch.Tensor | None:
        """x (M, K) @ weight.T + bias in the weight's dtype, split across `threads` (see `parallel`),
        or None for an input it does not take (another dtype or device, not 2-D)."""
        if x.dtype != self.dtype or x.dim() != 2 or not x.is_cpu or x.shape[1] != self.in_features:
            return None
        if x.stride(1) != 1 or x.stride(0) < self.in_features:
            x = x.contiguous()
        rows, k, n = x.shape[0], self.in_features, self.out_features
        y = x.new_empty(rows, n)
        self._fn(
            x.data_ptr(),
            x.stride(0),
            self._weight,
            self._bias,
            y.data_ptr(),
            n,
            rows,
            k,
            n,
            self._bf16,
            threads,
        )
        return y
