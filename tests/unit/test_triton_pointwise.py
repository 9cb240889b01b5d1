"""The Triton backend's element-wise kernels, run on the CPU under Triton's interpreter: each answers what
torch's ops do (to a last bit), on the layouts the layers hand them, and hands other inputs to torch."""

from __future__ import annotations

import os

import pytest
import torch

from serving.engine.backends.pointwise import TORCH


@pytest.fixture
def triton_pointwise():
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter runs where there is no GPU (tests/gpu runs the kernels on one)")
    from serving.engine.backends.triton_pointwise import TritonPointwise

    return TritonPointwise()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    # Float32 to a few ulps. Bfloat16 to a last bit at each of the (up to three) roundings in a row:
    # the interpreter truncates where a GPU rounds to nearest (tests/gpu checks the rounding on one).
    tolerance = 1e-5 if want.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "dim"), [(0, 64), (1, 100), (5, 96)])
def test_add_rms_norm_is_torchs(triton_pointwise, dtype: torch.dtype, rows: int, dim: int) -> None:
    torch.manual_seed(rows + dim)
    x, h = (torch.randn(rows, dim) * 3).to(dtype), torch.randn(rows, dim).to(dtype)
    weight = torch.randn(dim).to(dtype)
    for add in (h, None):
        total, out = triton_pointwise.add_rms_norm(x, add, weight, 1e-6)
        want_total, want_out = TORCH.add_rms_norm(x, add, weight, 1e-6)
        _close(total, want_total)
        _close(out, want_out)
        if dtype == torch.float32:  # one float32 addition: exactly torch's
            assert torch.equal(total, want_total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_turns_q_and_k_in_the_fused_row_in_place(triton_pointwise, dtype: torch.dtype) -> None:
    """Q's 3 heads and K's 1 side by side at the start of each fused QKV row (rows strided by the
    row's full width), V after them untouched."""
    torch.manual_seed(5)
    rows, dim = 6, 24
    qkv = torch.randn(rows, 5 * dim).to(dtype)
    before = qkv.clone()
    angles = torch.randn(rows, 1, dim // 2)
    cos = torch.cat([angles, angles], -1).cos().to(dtype)
    sin = torch.cat([angles, angles], -1).sin().to(dtype)
    view = qkv[:, : 4 * dim].view(rows, 4, dim)
    turned = triton_pointwise.rotary(view, cos, sin)
    assert turned.data_ptr() == view.data_ptr()  # in place
    _close(view, TORCH.rotary(before[:, : 4 * dim].view(rows, 4, dim), cos, sin))
    assert torch.equal(qkv[:, 4 * dim :], before[:, 4 * dim :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 40), (3, 1500)])
def test_silu_mul_is_torchs(triton_pointwise, dtype: torch.dtype, rows: int, hidden: int) -> None:
    """Including a width over one program's columns (a grid of column blocks)."""
    torch.manual_seed(hidden)
    gate_up = (torch.randn(rows, 2 * hidden) * 4).to(dtype)
    _close(triton_pointwise.silu_mul(gate_up), TORCH.silu_mul(gate_up))


def test_what_the_kernels_do_not_take_goes_to_torch(triton_pointwise, monkeypatch) -> None:
    """A layout the kernels do not take never reaches them, and the answer is torch's."""
    from serving.engine.backends import triton_pointwise as module

    monkeypatch.setattr(module, "_kernels", lambda: pytest.fail("a kernel was launched"))
    x = torch.randn(8, 6)
    weight = torch.randn(8)
    total, out = triton_pointwise.add_rms_norm(x.t(), None, weight, 1e-6)  # not contiguous
    assert torch.equal(out, TORCH.add_rms_norm(x.t(), None, weight, 1e-6)[1])
    heads_apart = torch.randn(4, 3, 2, 8).transpose(1, 2)[:, 0]  # each row's heads not contiguous
    cos, sin = torch.randn(4, 1, 8), torch.randn(4, 1, 8)
    assert torch.equal(triton_pointwise.rotary(heads_apart, cos, sin), TORCH.rotary(heads_apart, cos, sin))
    odd = torch.randn(2, 7)
    with pytest.raises(RuntimeError):  # no even split: torch's own error, as without the kernel
        triton_pointwise.silu_mul(odd)
