"""The engine's CPU speed-ups keep the model's numbers: fused projections, allocator settings, the
huge-page KV pool."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from torch import nn

from serving.engine import allocator
from serving.engine.models import loader
from serving.engine.models.config import load_model_config
from serving.engine.models.decoder import Attention
from serving.engine.models.layers import GatedMLP, concat_linear


def test_concat_linear_outputs_are_the_parts_side_by_side() -> None:
    torch.manual_seed(0)
    a, b, c = nn.Linear(32, 16), nn.Linear(32, 8), nn.Linear(32, 8)
    x = torch.randn(5, 32)
    fused = concat_linear(a, b, c)
    torch.testing.assert_close(fused(x), torch.cat([a(x), b(x), c(x)], dim=-1))
    assert not fused.weight.requires_grad


def test_loaded_model_is_fused_and_gives_the_unfused_logits(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_model_config(tiny_model)
    fused = loader.load_model(tiny_model, torch.float32, torch.device("cpu"), cfg)
    monkeypatch.setattr(loader, "fuse_projections", lambda model: None)
    plain = loader.load_model(tiny_model, torch.float32, torch.device("cpu"), cfg)
    attn = [m for m in fused.modules() if isinstance(m, Attention)]
    mlps = [m for m in fused.modules() if isinstance(m, GatedMLP)]
    assert attn and all(m.qkv is not None and not hasattr(m, "q_proj") for m in attn)
    assert mlps and all(m.gate_up is not None and not hasattr(m, "gate_proj") for m in mlps)
    assert all(m.qkv is None for m in plain.modules() if isinstance(m, Attention))
    torch.manual_seed(0)
    x = torch.randn(7, cfg.text.hidden_size)
    for f, p in zip(attn, [m for m in plain.modules() if isinstance(m, Attention)], strict=True):
        torch.testing.assert_close(f.qkv(x), torch.cat([p.q_proj(x), p.k_proj(x), p.v_proj(x)], -1))
    for f, p in zip(mlps, [m for m in plain.modules() if isinstance(m, GatedMLP)], strict=True):
        torch.testing.assert_close(f(x[:, : f.down_proj.out_features]), p(x[:, : p.down_proj.out_features]))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_allocator_settings_are_accepted() -> None:
    assert allocator.tune_allocator()


def test_zeros_huge_is_a_zeroed_tensor_of_the_shape() -> None:
    t = allocator.zeros_huge(64, 3, 2, 16, 2, 64, dtype=torch.bfloat16, device="cpu")
    assert t.shape == (64, 3, 2, 16, 2, 64) and t.dtype == torch.bfloat16
    assert t.is_contiguous() and not t.any()


def test_patch_embedding_as_a_matmul_equals_the_convolution(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_model_config(tiny_model)
    fused = loader.load_model(tiny_model, torch.float32, torch.device("cpu"), cfg)
    monkeypatch.setattr(loader, "fuse_projections", lambda model: None)
    plain = loader.load_model(tiny_model, torch.float32, torch.device("cpu"), cfg)
    assert fused.visual.patch_embed.flat is not None and plain.visual.patch_embed.flat is None
    torch.manual_seed(0)
    grid = (1, 4, 6)
    v = cfg.vision
    pixels = torch.randn(24, v.in_channels * v.temporal_patch_size * v.patch_size**2)
    torch.testing.assert_close(fused.visual.patch_embed(pixels), plain.visual.patch_embed(pixels))
    # Through the blocks, summation-order differences (packed matmuls) grow to ~1e-5 absolute; a wrong
    # weight layout would differ by the outputs' own size.
    torch.testing.assert_close(
        fused.encode(pixels, [grid]), plain.encode(pixels, [grid]), rtol=1e-3, atol=1e-4
    )


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_gives_the_linear_at_any_row_count(rows: int, dtype: torch.dtype) -> None:
    """Packed weights (and float32's few rows padded up to oneDNN's faster path) give `F.linear`'s
    result, with only as many rows as came in."""
    from serving.engine.models.cpu_linear import PackedLinear, packing_available

    torch.manual_seed(rows)
    linear = nn.Linear(64, 48).to(dtype).requires_grad_(False)
    if not packing_available(linear.weight):
        pytest.skip("oneDNN packing is not available here")
    x = torch.randn(rows, 64).to(dtype)
    out = PackedLinear(linear)(x)
    assert out.shape == (rows, 48)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, linear(x), rtol=tol, atol=tol)
