"""Building blocks shared by the vision tower and the decoder: norms, activations, rotary helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving.engine.kernels import fused


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight, as the reference does, so bf16 runs
        # round the same way.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_norm(self, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + h, norm(x + h)), h None meaning nothing to add: the residual add and the norm after it
        as one pass where the fused kernel runs."""
        done = fused.add_rms_norm(x, h, self.weight, self.eps)
        if done is not None:
            return done
        x = x if h is None else x + h
        return x, self(x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "silu": F.silu, "gelu": F.gelu}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class GatedMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)); the decoder's MLP and Qwen2.5's vision MLP."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[act]
        self.gate_up: nn.Linear | None = None

    def fuse(self) -> None:
        """Gate and up as one matmul (after the weights load): one pass over x, one call."""
        self.gate_up = concat_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate_up = self.gate_up(x)
            if self.act is F.silu and (product := fused.silu_mul(gate_up)) is not None:
                return self.down_proj(product)
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def concat_linear(*parts: nn.Linear) -> nn.Linear:
    """One linear whose outputs are `parts`' outputs side by side, on their weights' device and dtype.
    Projections that read the same input run as one larger matmul: fewer calls, and a shape the BLAS
    library runs nearer its peak (measured on CPU: 2816x512 at 88 GFLOP/s vs 1408x512 at 73)."""
    weight = parts[0].weight
    fused = nn.Linear(weight.shape[1], sum(p.out_features for p in parts), bias=parts[0].bias is not None)
    fused = fused.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(False)
