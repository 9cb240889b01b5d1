"""The Triton backend's element-wise steps (CUDA): the residual add with RMSNorm, the rotary embedding of
Q's and K's heads in place, the SiLU-gated product, each one launch.

In torch each is a chain of small kernels (the add and norm about eight, the rotary embedding six, the
gated product three), so at a decode step's few rows a layer pays some twenty launches for arithmetic
that takes less time than one; here a layer pays four. They round where the torch ops round (each
product and sum in bfloat16 is rounded to bfloat16 as torch's would be; the norm is taken in float32
as the reference does), so results differ from torch's by a last bit at most (a fused multiply-add or
an exponential rounded otherwise). Inputs they do not take (a layout other than the layers', a row
too wide for one program) go to torch's ops. Under `TRITON_INTERPRET=1` they run on the CPU, which is
how the CPU test suite checks them (tests/unit/test_triton_pointwise.py).
"""

from __future__ import annotations

from functools import cache

import torch

from serving.engine.backends.pointwise import Pointwise

_WIDEST = 16384  # the longest row one program normalises or turns; wider goes to torch
_COLUMNS = 1024  # columns of the gated product per program


class TritonPointwise(Pointwise):
    name = "triton"

    def add_rms_norm(
        self, x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        operands = (x, weight) if h is None else (x, h, weight)
        if x.dim() != 2 or x.shape[1] > _WIDEST or not all(t.is_contiguous() for t in operands):
            return super().add_rms_norm(x, h, weight, eps)
        if h is not None and h.shape != x.shape:
            return super().add_rms_norm(x, h, weight, eps)
        rows, dim = x.shape
        total = x if h is None else torch.empty_like(x)
        out = torch.empty_like(x)
        if rows:
            _kernels().add_rms_norm[(rows,)](
                x, x if h is None else h, total, weight, out, dim, eps,
                HAS_H=h is not None, BLOCK=_width(dim),
            )  # fmt: skip
        return total, out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[2] % 2 or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
            return super().rotary(x, cos, sin)
        rows, heads, dim = x.shape
        if heads * dim > _WIDEST or not (cos.is_contiguous() and sin.is_contiguous()):
            return super().rotary(x, cos, sin)
        if cos.numel() != rows * dim or sin.numel() != rows * dim:
            return super().rotary(x, cos, sin)
        if rows:
            _kernels().rotary[(rows,)](
                x, cos, sin, x.stride(0), heads, dim // 2,
                BLOCK_H=_width(heads, 1), BLOCK_D=_width(dim // 2, 1),
            )  # fmt: skip
        return x

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.dim() != 2 or gate_up.shape[1] % 2 or not gate_up.is_contiguous():
            return super().silu_mul(gate_up)
        rows, hidden = gate_up.shape[0], gate_up.shape[1] // 2
        out = gate_up.new_empty(rows, hidden)
        if rows:
            import triton

            grid = (rows, triton.cdiv(hidden, _COLUMNS))
            _kernels().silu_mul[grid](gate_up, out, hidden, BLOCK=min(_COLUMNS, _width(hidden)))
        return out


def _width(n: int, least: int = 16) -> int:
    import triton

    return max(least, triton.next_power_of_2(n))


class _Kernels:
    def __init__(self, add_rms_norm, rotary, silu_mul) -> None:  # noqa: ANN001 - triton.JITFunction
        self.add_rms_norm, self.rotary, self.silu_mul = add_rms_norm, rotary, silu_mul


@cache
def _kernels() -> _Kernels:  # built on first use, so importing this module needs no Triton
    import triton
    import triton.language as tl

    # Every product and sum is taken in float32 and rounded to the input's dtype where torch's op on
    # that dtype rounds its result, to nearest even as torch rounds (Triton's default on a GPU, asked
    # for all the same; Triton 3.9's interpreter truncates regardless, so on the CPU a bfloat16 result
    # can be a last bit lower than torch's).
    @triton.jit
    def add_rms_norm(X, H, Total, W, Out, dim, eps, HAS_H: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * dim
        cols = tl.arange(0, BLOCK)
        ok = cols < dim
        x = tl.load(X + row + cols, mask=ok, other=0.0)
        dtype = x.dtype
        if HAS_H:
            h = tl.load(H + row + cols, mask=ok, other=0.0)
            x = (x.to(tl.float32) + h.to(tl.float32)).to(dtype, fp_downcast_rounding="rtne")
            tl.store(Total + row + cols, x, mask=ok)
        wide = x.to(tl.float32)
        mean_square = tl.sum(wide * wide, axis=0) / dim
        scale = tl.div_rn(1.0, tl.sqrt_rn(mean_square + eps))  # as the CPU's rsqrt
        normed = (wide * scale).to(dtype, fp_downcast_rounding="rtne")
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(
            Out + row + cols, (w * normed.to(tl.float32)).to(dtype, fp_downcast_rounding="rtne"), mask=ok
        )

    @triton.jit
    def rotary(X, Cos, Sin, stride_row, heads, half, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < half
        ok = (h < heads)[:, None] & d_ok[None, :]
        first = X + row * stride_row + h[:, None] * (2 * half) + d[None, :]
        x1 = tl.load(first, mask=ok, other=0.0)
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = tl.load(first + half, mask=ok, other=0.0).to(tl.float32)
        angle = row * (2 * half) + d
        c1 = tl.load(Cos + angle, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(Cos + angle + half, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(Sin + angle, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(Sin + angle + half, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        # x * cos + rotate_half(x) * sin, rotate_half(x) being (-x2, x1).
        out1 = (x1 * c1).to(dtype, fp_downcast_rounding="rtne").to(tl.float32) + (-x2 * s1).to(
            dtype, fp_downcast_rounding="rtne"
        ).to(tl.float32)
        out2 = (x2 * c2).to(dtype, fp_downcast_rounding="rtne").to(tl.float32) + (x1 * s2).to(
            dtype, fp_downcast_rounding="rtne"
        ).to(tl.float32)
        tl.store(first, out1.to(dtype, fp_downcast_rounding="rtne"), mask=ok)
        tl.store(first + half, out2.to(dtype, fp_downcast_rounding="rtne"), mask=ok)

    @triton.jit
    def silu_mul(GateUp, Out, hidden, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < hidden
        gate = tl.load(GateUp + row * 2 * hidden + cols, mask=ok, other=0.0)
        dtype = gate.dtype
        up = tl.load(GateUp + row * 2 * hidden + hidden + cols, mask=ok, other=0.0).to(tl.float32)
        wide = gate.to(tl.float32)
        activated = (
            (wide / (1.0 + tl.exp(-wide))).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        )  # F.silu rounds here
        tl.store(Out + row * hidden + cols, (activated * up).to(dtype, fp_downcast_rounding="rtne"), mask=ok)

    return _Kernels(add_rms_norm, rotary, silu_mul)
