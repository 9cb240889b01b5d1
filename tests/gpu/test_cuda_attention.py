"""The attention backends on a CUDA device: the Triton kernel (one launch per layer for a mixed batch)
and the batched torch path both equal the dense reference, in float32 and bfloat16; the engine picks
Triton on CUDA. Skipped where PyTorch sees no GPU (the CPU suite checks the same kernel under
Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from serving.engine.backends import backend_for
from serving.engine.backends.torch_sdpa import TorchBackend
from tests.unit.test_attention_backends import reference, slots

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
HEADS, KV_HEADS = 28, 4  # Qwen2.5-VL-7B's heads per KV head


def mixed_batch(seed: int, block: int, dim: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    q_lens = [1] * 24 + [200, 37, 1, 512]  # decode tokens, prompts and a chunk (37 of 300)
    ctx_lens = [int(torch.randint(1, 3000, (1,), generator=g)) for _ in range(24)] + [200, 300, 17, 512]
    blocks = sum(-(-c // block) for c in ctx_lens) + 8
    order = torch.randperm(blocks, generator=g).tolist()
    tables = []
    for c in ctx_lens:
        n = -(-c // block)
        tables.append(order[:n])
        order = order[n:]
    layer = torch.randn(blocks, 2, block, KV_HEADS, dim, generator=g).to("cuda", dtype)
    total = sum(q_lens)
    q, k, v = (torch.randn(total, n, dim, generator=g).to("cuda", dtype) for n in (HEADS, KV_HEADS, KV_HEADS))
    return layer, q_lens, ctx_lens, tables, q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 7])
def test_triton_and_torch_backends_equal_the_reference(dtype, block):
    from serving.engine.backends.triton_paged import TritonBackend

    tolerance = 2e-4 if dtype == torch.float32 else 2e-2
    for backend in (TritonBackend(), TorchBackend()):
        layer, q_lens, ctx_lens, tables, q, k, v = mixed_batch(0, block, 128, dtype)
        out = backend.forward(q, k, v, layer, backend.plan(q_lens, ctx_lens, tables, block, q.device))
        t = 0
        for q_len, ctx, table in zip(q_lens, ctx_lens, tables, strict=True):
            b, o = slots(table, block, range(ctx))
            keys, values = layer[:, 0][b.cuda(), o.cuda()], layer[:, 1][b.cuda(), o.cuda()]
            expected = reference(q[t : t + q_len].cpu().float(), keys.cpu().float(), values.cpu().float())
            error = (out[t : t + q_len].cpu().double() - expected).abs().max().item()
            assert error < tolerance, (backend.name, dtype, q_len, ctx, error)
            t += q_len


def test_the_engine_runs_triton_on_cuda(tiny_model):
    from serving.config import EngineConfig
    from serving.engine.llm import LLMEngine

    assert backend_for(torch.device("cuda")).name == "triton"
    e = LLMEngine(EngineConfig(model=str(tiny_model), device="cuda", dtype="bfloat16"))
    assert e.runner.attention.name == "triton"
    assert e.runner.model.model.layers[0].mlp.pointwise.name == "triton"


def test_attention_time_is_printed():
    """One layer's attention for 64 decode tokens at 2,048 context and one 2,048-token prompt:
    Triton against the batched torch path (printed, not asserted)."""
    from serving.engine.backends.triton_paged import TritonBackend

    block, dim = 16, 128
    for name, q_lens, ctx_lens in (
        ("decode 64 x 2048", [1] * 64, [2048] * 64),
        ("prefill 2048", [2048], [2048]),
    ):
        blocks = sum(-(-c // block) for c in ctx_lens)
        tables, order = [], list(range(blocks))
        for c in ctx_lens:
            n = -(-c // block)
            tables.append(order[:n])
            order = order[n:]
        layer = torch.randn(blocks, 2, block, KV_HEADS, dim, device="cuda", dtype=torch.bfloat16)
        total = sum(q_lens)
        q = torch.randn(total, HEADS, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(total, KV_HEADS, dim, device="cuda", dtype=torch.bfloat16)
        times = {}
        for backend in (TritonBackend(), TorchBackend()):
            batch = backend.plan(q_lens, ctx_lens, tables, block, q.device)
            for _ in range(3):
                backend.forward(q, k, k, layer, batch)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                backend.forward(q, k, k, layer, batch)
            end.record()
            torch.cuda.synchronize()
            times[backend.name] = start.elapsed_time(end) / 20
        print(f"\n{name}: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in times.items()))
