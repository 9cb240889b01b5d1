"""The decoder's fused element-wise kernels (`fused_ops.c`) compute what the torch ops they replace do,
decline what they cannot run, and leave the model's output unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from serving.engine import kernels
from serving.engine.backends.pointwise import TORCH, CpuPointwise, apply_rotary
from serving.engine.kernels import fused
from serving.engine.models.layers import RMSNorm

needs_kernels = pytest.mark.skipif(kernels.load("fused_ops") is None, reason="no C compiler: kernels off")


@needs_kernels
@pytest.mark.parametrize("rows", [0, 1, 5, 300])
@pytest.mark.parametrize("dim", [64, 100])
def test_add_rms_norm_is_the_residual_add_and_the_reference_norm(rows: int, dim: int, one_thread) -> None:
    torch.manual_seed(rows + dim)
    norm = RMSNorm(dim, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim))
    x, h = torch.randn(rows, dim) * 3, torch.randn(rows, dim)
    x_before = x.clone()
    total, out = fused.add_rms_norm(x, h, norm.weight, norm.eps)
    torch.testing.assert_close(total, x_before + h, rtol=0, atol=0)
    torch.testing.assert_close(out, norm(x_before + h), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_before)  # inputs untouched
    same, alone = fused.add_rms_norm(x, None, norm.weight, norm.eps)
    assert same is x
    torch.testing.assert_close(alone, norm(x), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_rotary_turns_strided_rows_in_place_like_the_reference(one_thread) -> None:
    """Q's and K's heads at the start of each fused QKV row: the V columns after them stay as they were."""
    torch.manual_seed(0)
    tokens, heads, dim, v_cols = 7, 5, 64, 128
    qkv = torch.randn(tokens, heads * dim + v_cols)
    before = qkv.clone()
    angles = torch.randn(tokens, 1, dim // 2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    view = qkv[:, : heads * dim].view(tokens, heads, dim)
    assert fused.rotary_(view, cos, sin)
    want = apply_rotary(before[:, : heads * dim].view(tokens, heads, dim), cos, sin)
    torch.testing.assert_close(view, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, heads * dim :], before[:, heads * dim :])


@needs_kernels
@pytest.mark.parametrize("rows", [0, 3, 200])
def test_silu_mul_is_the_gated_product(rows: int, one_thread) -> None:
    torch.manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 96) * 6
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


def test_fused_ops_decline_what_they_cannot_run() -> None:
    """Other dtypes, layouts the loops do not take, and large inputs while torch has several threads:
    the caller's torch path runs instead."""
    w = torch.ones(8)
    assert fused.add_rms_norm(torch.randn(2, 8, dtype=torch.float64), None, w.double(), 1e-6) is None
    assert fused.add_rms_norm(torch.randn(8, 2).t(), None, w, 1e-6) is None  # not contiguous
    assert fused.silu_mul(torch.randn(2, 7)) is None  # no even split into gate and up
    assert fused.silu_mul(torch.randn(2, 8, dtype=torch.float16)) is None
    x = torch.randn(3, 2, 8)
    assert not fused.rotary_(x.transpose(0, 1), torch.ones(2, 8), torch.ones(2, 8))  # heads not contiguous
    assert not fused.rotary_(x, torch.ones(3, 4), torch.ones(3, 4))  # cos/sin of another size
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fused.silu_mul(torch.randn(500, 16)) is None
        small = fused.add_rms_norm(torch.randn(2, 8), None, w, 1e-6)  # a few rows: still the kernel
        assert (small is not None) == (kernels.load("fused_ops") is not None)
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_bfloat16_kernels_round_where_the_torch_ops_do(rows: int, one_thread) -> None:
    """In bfloat16 each kernel rounds after every step the torch ops round after: the residual sum,
    the norm and the rotary embedding come out bit for bit; SiLU may differ in the last bit where
    the two exps do."""
    torch.manual_seed(rows)
    norm = RMSNorm(512, 1e-6).bfloat16().requires_grad_(False)
    norm.weight.copy_(torch.randn(512))
    x, h = (torch.randn(rows, 512) * 3).bfloat16(), torch.randn(rows, 512).bfloat16()
    total, out = fused.add_rms_norm(x, h, norm.weight, norm.eps)
    assert torch.equal(total, x + h) and torch.equal(out, norm(x + h))

    qkv = torch.randn(rows, 768).bfloat16()
    before = qkv.clone()
    angles = torch.randn(rows, 1, 32)
    cos = torch.cat([angles, angles], -1).cos().bfloat16()
    sin = torch.cat([angles, angles], -1).sin().bfloat16()
    view = qkv[:, :640].view(rows, 10, 64)
    assert fused.rotary_(view, cos, sin)
    assert torch.equal(view, apply_rotary(before[:, :640].view(rows, 10, 64), cos, sin))
    assert torch.equal(qkv[:, 640:], before[:, 640:])

    gate_up = (torch.randn(rows, 2 * 1408) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_cpu_backends_element_wise_steps_are_torchs(dtype: torch.dtype, one_thread) -> None:
    """What the layers call (`pointwise`): the CPU backend's runs the kernels where they take the input
    and torch's ops where they decline (float64 here, or no compiler), and either way answers what the
    torch one does: the sum and its norm, Q's and K's heads turned in a fused QKV row (in place or
    not: the caller takes what is returned), the gated product."""
    torch.manual_seed(3)
    cpu, rows = CpuPointwise(), 7
    weight, eps = torch.randn(96).to(dtype), 1e-6
    x, h = torch.randn(rows, 96).to(dtype), torch.randn(rows, 96).to(dtype)
    exact = dtype != torch.float32  # bfloat16 rounds where torch does; float64 is torch itself
    for add in (h, None):
        pairs = zip(
            cpu.add_rms_norm(x, add, weight, eps), TORCH.add_rms_norm(x, add, weight, eps), strict=True
        )
        for got, want in pairs:
            assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-5, atol=1e-6)

    qkv = torch.randn(rows, 5 * 32).to(dtype)
    angles = torch.randn(rows, 1, 16)
    cos, sin = (
        torch.cat([angles, angles], -1).cos().to(dtype),
        torch.cat([angles, angles], -1).sin().to(dtype),
    )
    want = TORCH.rotary(qkv[:, : 4 * 32].view(rows, 4, 32), cos, sin)
    got = cpu.rotary(qkv[:, : 4 * 32].view(rows, 4, 32), cos, sin)
    assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-5, atol=1e-6)

    gate_up = torch.randn(rows, 2 * 48).to(dtype)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(cpu.silu_mul(gate_up), TORCH.silu_mul(gate_up), rtol=tolerance, atol=tolerance)


@needs_kernels
def test_greedy_tokens_are_the_same_with_and_without_the_fused_kernels(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt's greedy continuation through the decoder with the fused kernels and with the torch
    ops alone."""
    from serving.config import EngineConfig
    from serving.engine.llm import LLMEngine
    from serving.types import SamplingParams

    def tokens() -> list[int]:
        engine = LLMEngine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32"))
        prompt = engine.inputs.from_user_prompt("a small picture of a river at night", [])
        return engine.generate([(prompt, SamplingParams(max_tokens=12, ignore_eos=True))])[0].token_ids

    with_kernels = tokens()
    monkeypatch.setitem(kernels._libraries, "fused_ops", None)
    assert tokens() == with_kernels


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_puts_each_row_in_its_slot_like_indexed_assignment(dtype: torch.dtype) -> None:
    """Keys and values as they come out of the fused QKV projection (strided rows) into one layer of a
    block-major pool (a strided view), as `_write_kv`'s indexed assignment does."""
    torch.manual_seed(1)
    blocks, layers, block_size, kv_heads, dim, rows = 6, 3, 4, 2, 16, 9
    pool = torch.randn(blocks, layers, 2, block_size, kv_heads, dim).to(dtype)
    want = pool.clone()
    qkv = torch.randn(rows, (4 + 2 * kv_heads) * dim).to(dtype)
    k = qkv[:, 4 * dim : (4 + kv_heads) * dim].view(rows, kv_heads, dim)
    v = qkv[:, (4 + kv_heads) * dim :].view(rows, kv_heads, dim)
    slots = torch.randperm(blocks * block_size)[:rows]
    where_blocks, where_offsets = slots // block_size, slots % block_size
    assert fused.write_kv(k, v, pool[:, 1], where_blocks, where_offsets)
    want[:, 1][where_blocks, 0, where_offsets] = k
    want[:, 1][where_blocks, 1, where_offsets] = v
    assert torch.equal(pool, want)  # and nothing else in the pool moved
    if dtype != torch.float32:  # keys of another dtype than the pool's: declined, nothing written
        assert not fused.write_kv(k.float(), v, pool[:, 1], where_blocks, where_offsets)
        assert torch.equal(pool, want)
