"""The Triton backend's element-wise kernels on a CUDA device, at Qwen2.5-VL-7B's widths: they answer
what torch's ops do (the bfloat16 residual sum bit for bit, rounded to nearest as torch rounds; the rest
to a last bit), and one layer's element-wise steps are timed against torch's (printed, not asserted).
Skipped where PyTorch sees no GPU (the CPU suite checks the same kernels under Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from serving.engine.backends.pointwise import TORCH, Pointwise

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 3584, 28, 4, 128, 18944


def _inputs(rows: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to("cuda", dtype)

    angles = torch.randn(rows, 1, HEAD_DIM // 2, generator=g)
    return {
        "x": rand(rows, HIDDEN, scale=3),
        "h": rand(rows, HIDDEN),
        "weight": rand(HIDDEN),
        "qkv": rand(rows, (HEADS + 2 * KV_HEADS) * HEAD_DIM),
        "cos": torch.cat([angles, angles], -1).cos().to("cuda", dtype),
        "sin": torch.cat([angles, angles], -1).sin().to("cuda", dtype),
        "gate_up": rand(rows, 2 * INTERMEDIATE, scale=4),
    }


def _layer(ops: Pointwise, t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """One decoder layer's element-wise steps, in the order the layer runs them."""
    rows = t["x"].shape[0]
    total, normed = ops.add_rms_norm(t["x"], t["h"], t["weight"], 1e-6)
    qk = t["qkv"].clone()[:, : (HEADS + KV_HEADS) * HEAD_DIM].view(rows, HEADS + KV_HEADS, HEAD_DIM)
    turned = ops.rotary(qk, t["cos"], t["sin"])
    again, normed_again = ops.add_rms_norm(total, normed, t["weight"], 1e-6)
    return [total, normed, turned, again, normed_again, ops.silu_mul(t["gate_up"])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 64, 300])
def test_the_triton_element_wise_kernels_are_torchs(dtype: torch.dtype, rows: int) -> None:
    from serving.engine.backends.triton_pointwise import TritonPointwise

    t = _inputs(rows, dtype)
    got, want = _layer(TritonPointwise(), t), _layer(TORCH, t)
    assert torch.equal(got[0], want[0]), "the residual sum rounds as torch's add does"
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7
    for name, g, w in zip(("sum", "norm", "rotary", "sum 2", "norm 2", "silu_mul"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}")


def test_the_element_wise_time_is_printed() -> None:
    """One layer's element-wise steps at 1 and 64 rows in bfloat16: Triton (four launches) against
    torch's ops (printed, not asserted)."""
    from serving.engine.backends.triton_pointwise import TritonPointwise

    for rows in (1, 64):
        t = _inputs(rows, torch.bfloat16)
        times = {}
        for ops in (TritonPointwise(), TORCH):
            for _ in range(3):
                _layer(ops, t)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                _layer(ops, t)
            end.record()
            torch.cuda.synchronize()
            times[ops.name] = start.elapsed_time(end) / 50 * 1000
        print(
            f"\nelement-wise steps of one 7B-wide layer, {rows} rows, bfloat16: "
            f"triton {times['triton']:.1f} us, torch {times['torch']:.1f} us "
            f"({times['torch'] / times['triton']:.2f}x)"
        )
