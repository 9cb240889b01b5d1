"""A layer's element-wise steps, run the way its backend runs them: the residual add with RMSNorm, the
rotary embedding of Q and K, the SiLU-gated product.

`Pointwise` is torch's ops (any device); the layers hold one (`pointwise`, this one unless their
backend's `prepare` binds another) and call it, never a device check of their own. The CPU backend's
(`CpuPointwise`) runs the C kernels where they take the input and these ops where they do not; both
compute the same thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving.engine.kernels import fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and cast back before the weight, as the reference does, so bf16 runs round
    # the same way.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Pointwise:
    """Torch's element-wise ops."""

    name = "torch"

    def add_rms_norm(
        self, x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + h, RMSNorm(x + h)); h None meaning nothing to add."""
        x = x if h is None else x + h
        return x, rms_norm(x, weight, eps)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (rows, heads, dim) turned by cos, sin (rows, 1, dim). A backend may turn x in place and
        return it; the caller uses what is returned."""
        return apply_rotary(x, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up, gate_up (rows, 2 * hidden) holding them side by side."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class CpuPointwise(Pointwise):
    """The C kernels (`fused_ops.c`), torch's ops for what they decline (another dtype, a layout they
    do not take, many rows with several intra-op threads, no compiler)."""

    name = "cpu"

    def add_rms_norm(
        self, x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return fused.add_rms_norm(x, h, weight, eps) or super().add_rms_norm(x, h, weight, eps)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x if fused.rotary_(x, cos, sin) else apply_rotary(x, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        product = fused.silu_mul(gate_up)
        return super().silu_mul(gate_up) if product is None else product


TORCH = Pointwise()


def bind(model: nn.Module, pointwise: Pointwise) -> None:
    """Every module of `model` that runs element-wise steps (those with a `pointwise`) runs them
    through `pointwise`."""
    for module in model.modules():
        if hasattr(module, "pointwise"):
            module.pointwise = pointwise
