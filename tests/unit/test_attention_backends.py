"""Every attention backend (the C kernels, the batched torch path, the Triton kernel under Triton's CPU
interpreter) equals plain attention over each sequence's dense context, on random ragged batches that
mix decode tokens, whole prompts and chunks continuing a cached prompt, with block sizes that do not
divide anything, and heads sharing KV heads."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from serving.engine.backends import backend_for, checked
from serving.engine.backends.cpu import CpuBackend
from serving.engine.backends.pointwise import Pointwise
from serving.engine.backends.torch_sdpa import TorchBackend

HEADS, KV_HEADS = 8, 2


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q (q_len, H, D) at the last q_len positions of keys/values (ctx, KV, D): causal softmax attention."""
    q_len, ctx, dim = q.shape[0], keys.shape[0], q.shape[2]
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1).double()
    v = values.repeat_interleave(group, dim=1).transpose(0, 1).double()
    scores = q.transpose(0, 1).double() @ k.transpose(1, 2) / math.sqrt(dim)
    q_pos = torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(q_len, -1)


def ragged_batch(
    seed: int,
    block: int,
    dim: int,
    dtype: torch.dtype,
    spare: int = 2,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = 160
    layer = torch.randn(num_blocks, 2, block, kv_heads, dim).to(dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered, out-of-order block tables
    q_lens, ctx_lens, tables = [], [], []
    for _ in range(rng.randint(1, 7)):
        kind = rng.choice(["decode", "decode", "prompt", "chunk"])
        ctx = rng.randint(1, 45)
        q_len = {"decode": 1, "prompt": ctx, "chunk": rng.randint(1, ctx)}[kind]
        tables.append([free.pop() for _ in range(-(-ctx // block) + rng.randint(0, spare))])
        q_lens.append(q_len)
        ctx_lens.append(ctx)
    total = sum(q_lens)
    # Views into one fused row per token, as the model's Q/K/V projection hands them over: not contiguous.
    q, k, v = torch.randn(total, heads + 2 * kv_heads, dim).to(dtype).split([heads, kv_heads, kv_heads], 1)
    return layer, q_lens, ctx_lens, tables, q, k, v


def slots(table: list[int], block: int, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, offsets) of these positions of a sequence, to index a pool layer's keys or values."""
    return torch.tensor([table[p // block] for p in positions]), torch.tensor([p % block for p in positions])


def check(
    backend,
    seed: int,
    block: int,
    dim: int,
    dtype: torch.dtype,
    tolerance: float,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
):  # noqa: ANN001, ANN201
    """The backend's output for a ragged mixed batch equals the reference; returns the step's plan."""
    layer, q_lens, ctx_lens, tables, q, k, v = ragged_batch(
        seed, block, dim, dtype, heads=heads, kv_heads=kv_heads
    )
    before = layer.clone()
    batch = backend.plan(q_lens, ctx_lens, tables, block, torch.device("cpu"))
    out = backend.forward(q, k, v, layer, batch)
    assert out.shape == (q.shape[0], heads * dim) and out.dtype == dtype
    t = 0
    for q_len, ctx, table in zip(q_lens, ctx_lens, tables, strict=True):
        rows = (
            torch.tensor([table[p // block] for p in range(ctx)]),
            torch.tensor([p % block for p in range(ctx)]),
        )
        keys, values = layer[:, 0][rows], layer[:, 1][rows]
        # The new tokens landed in their slots; what was cached before them is untouched.
        assert torch.equal(keys[ctx - q_len :], k[t : t + q_len])
        assert torch.equal(values[ctx - q_len :], v[t : t + q_len])
        assert torch.equal(keys[: ctx - q_len], before[:, 0][rows][: ctx - q_len])
        expected = reference(q[t : t + q_len], keys, values)
        error = (out[t : t + q_len].double() - expected).abs().max().item()
        assert error < tolerance, (backend.name, q_len, ctx, error)
        t += q_len
    return batch


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block", [3, 16])
def test_cpu_and_torch_backends_equal_the_reference(seed: int, block: int) -> None:
    for backend in (CpuBackend(), TorchBackend()):
        check(backend, seed, block, 16, torch.float32, 1e-5)
        check(backend, seed, block, 16, torch.bfloat16, 3e-2)


def test_the_torch_backend_makes_two_calls_per_layer(monkeypatch) -> None:
    """The fallback is batched: one attention call per group (decode, prompt), not one per sequence."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    seed = next(s for s in range(50) if len({n > 1 for n in ragged_batch(s, 4, 16, torch.float32)[1]}) == 2)
    layer, q_lens, ctx_lens, tables, q, k, v = ragged_batch(seed, 4, 16, torch.float32)
    assert len(q_lens) > 2, "decode tokens and prompt tokens of several sequences"
    backend = TorchBackend()
    backend.forward(q, k, v, layer, backend.plan(q_lens, ctx_lens, tables, 4, torch.device("cpu")))
    assert len(calls) == 2


def test_a_wrong_context_is_caught() -> None:
    """Negative control: the reference over one key fewer differs from what the backends return."""
    layer, q_lens, ctx_lens, tables, q, k, v = ragged_batch(1, 5, 16, torch.float32, spare=0)
    i = max(range(len(ctx_lens)), key=lambda j: ctx_lens[j] - q_lens[j])
    assert ctx_lens[i] > q_lens[i], "a sequence with cached context"
    backend = TorchBackend()
    out = backend.forward(q, k, v, layer, backend.plan(q_lens, ctx_lens, tables, 5, torch.device("cpu")))
    t = sum(q_lens[:i])
    ctx, table = ctx_lens[i], tables[i]
    rows = (
        torch.tensor([table[p // 5] for p in range(1, ctx)]),
        torch.tensor([p % 5 for p in range(1, ctx)]),
    )
    wrong = reference(q[t : t + q_lens[i]], layer[:, 0][rows], layer[:, 1][rows])
    assert (out[t : t + q_lens[i]].double() - wrong).abs().max() > 1e-3


def test_the_backend_follows_the_device_and_the_override(monkeypatch) -> None:
    monkeypatch.delenv("EPD_ATTENTION_BACKEND", raising=False)
    assert backend_for(torch.device("cpu")).name == "cpu"
    assert backend_for(torch.device("meta")).name == "torch"
    monkeypatch.setenv("EPD_ATTENTION_BACKEND", "torch")
    assert backend_for(torch.device("cpu")).name == "torch"
    monkeypatch.setenv("EPD_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="cpu, triton, torch"):
        backend_for(torch.device("cpu"))


@pytest.fixture
def triton_interpreter():
    """The Triton kernel runs on the CPU under Triton's interpreter (tests/conftest.py sets it)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter runs where there is no GPU (tests/gpu runs the kernel on one)")
    from serving.engine.backends import triton_paged

    return triton_paged


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("block", "dim"), [(3, 16), (16, 24)])
def test_the_triton_kernel_equals_the_reference(triton_interpreter, seed: int, block: int, dim: int) -> None:
    """One launch for the whole mixed batch; odd block sizes and a head size that is not a power of 2."""
    check(triton_interpreter.TritonBackend(), seed, block, dim, torch.float32, 1e-5)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (28, 4), (16, 1), (17, 1)])
def test_a_decode_tokens_query_heads_share_their_kv_heads_tile(triton_interpreter, heads, kv_heads) -> None:
    """A decode token is one tile whose programs each take the query heads of one KV head (its keys
    and values read once for them all, not once per head): up to 16 heads to a KV head, a tile's rows;
    more (17 here) fall back to a tile per head. Mixed with prompts and chunks, both equal the
    reference."""
    seed = next(s for s in range(50) if len({n > 1 for n in ragged_batch(s, 4, 16, torch.float32)[1]}) == 2)
    batch = check(triton_interpreter.TritonBackend(), seed, 4, 16, torch.float32, 1e-5, heads, kv_heads)
    decode_tiles = [
        row for seq, row in zip(batch.extra.tile_seq.tolist(), batch.extra.tile_row.tolist(), strict=True)
        if batch.extra.q_len[seq] == 1
    ]  # fmt: skip
    assert decode_tiles and set(decode_tiles) == {
        triton_interpreter.GROUPED if heads // kv_heads <= 16 else 0
    }


def test_the_triton_kernel_reads_bfloat16_pools(triton_interpreter) -> None:
    check(triton_interpreter.TritonBackend(), 7, 16, 16, torch.bfloat16, 3e-2)


def test_a_step_runs_one_triton_launch_per_layer(triton_interpreter, monkeypatch) -> None:
    launches = []
    real = triton_interpreter.paged_attention_triton
    monkeypatch.setattr(
        triton_interpreter, "paged_attention_triton", lambda *a: launches.append(1) or real(*a)
    )
    layer, q_lens, ctx_lens, tables, q, k, v = ragged_batch(2, 4, 16, torch.float32)
    backend = triton_interpreter.TritonBackend()
    batch = backend.plan(q_lens, ctx_lens, tables, 4, torch.device("cpu"))
    backend.forward(q, k, v, layer, batch)
    assert len(launches) == 1 and batch.extra.tiles == sum(-(-n // 16) for n in q_lens)


@pytest.mark.skipif(os.environ.get("EPD_CPU_KERNELS") == "0", reason="checks the kernels' own path")
def test_the_cpu_backend_runs_the_kernels_not_the_fallback(monkeypatch) -> None:
    from serving.engine import kernels
    from serving.engine.backends import cpu

    if kernels.library() is None:
        pytest.skip("no C kernels here")
    monkeypatch.setattr(cpu, "attend_padded", lambda *a: pytest.fail("the torch path ran"))
    check(CpuBackend(), 3, 5, 16, torch.float32, 1e-5)


def test_a_working_kernel_passes_the_start_up_check(triton_interpreter) -> None:
    backend = triton_interpreter.TritonBackend()
    assert checked(backend, HEADS, KV_HEADS, 16, 4, torch.float32, torch.device("cpu")) == (backend, None)
    cpu = CpuBackend()
    assert checked(cpu, HEADS, KV_HEADS, 16, 4, torch.float32, torch.device("cpu")) == (cpu, None)


@pytest.mark.parametrize("fault", ["raises", "wrong"])
def test_a_kernel_that_fails_or_differs_at_start_up_falls_back_to_torch(triton_interpreter, fault) -> None:
    """A kernel that does not compile for the device (raises) or computes something else: the worker
    runs on the torch backend, with the reason, instead of failing every request."""

    class Broken(triton_interpreter.TritonBackend):
        def forward(self, q, k, v, kv_cache, batch):
            if fault == "raises":
                raise RuntimeError("PTX: unsupported on this device")
            return super().forward(q, k, v, kv_cache, batch) + 0.25

    backend, reason = checked(Broken(), HEADS, KV_HEADS, 16, 4, torch.bfloat16, torch.device("cpu"))
    assert backend.name == "torch"
    assert reason is not None and ("PTX" in reason if fault == "raises" else "differs" in reason)
    assert "(attention)" in reason


@pytest.mark.parametrize("fault", ["raises", "wrong"])
@pytest.mark.parametrize("step", ["add_rms_norm", "rotary", "silu_mul"])
def test_an_element_wise_kernel_that_fails_or_differs_falls_back_to_torch(triton_interpreter, fault, step):
    """The same for each of the backend's element-wise kernels: its attention fine, the worker still
    runs on torch (whose element-wise steps are torch's) and says which part failed."""
    from serving.engine.backends.triton_pointwise import TritonPointwise

    class BrokenStep(TritonPointwise):
        pass

    def broken(self, *args):  # noqa: ANN001, ANN002, ANN202
        if fault == "raises":
            raise RuntimeError("PTX: unsupported on this device")
        out = getattr(TritonPointwise, step)(self, *args)
        return (out[0], out[1] + 0.25) if isinstance(out, tuple) else out + 0.25

    setattr(BrokenStep, step, broken)

    class Broken(triton_interpreter.TritonBackend):
        def pointwise(self):  # noqa: ANN202
            return BrokenStep()

    backend, reason = checked(Broken(), HEADS, KV_HEADS, 16, 4, torch.float32, torch.device("cpu"))
    assert backend.name == "torch" and type(backend.pointwise()) is Pointwise
    assert reason is not None and "(element-wise steps)" in reason
    assert "PTX" in reason if fault == "raises" else "differs" in reason


def test_an_engine_whose_kernel_fails_serves_on_torch(triton_interpreter, tiny_model, monkeypatch) -> None:
    """The same through the engine: asked for Triton, its kernel failing, it serves the same greedy
    tokens as the torch backend does."""
    from serving.config import EngineConfig
    from serving.engine.llm import LLMEngine
    from serving.types import SamplingParams

    def generate() -> tuple[str, list[int]]:
        engine = LLMEngine(EngineConfig(model=str(tiny_model), device="cpu", num_kv_blocks=64, block_size=8))
        prompt = engine.inputs.from_user_prompt("Say something.", [])
        (result,) = engine.generate([(prompt, SamplingParams(max_tokens=6, ignore_eos=True))])
        return engine.runner.attention.name, result.token_ids

    monkeypatch.setenv("EPD_ATTENTION_BACKEND", "torch")
    _, expected = generate()
    monkeypatch.setenv("EPD_ATTENTION_BACKEND", "triton")

    def fails(*_args):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(triton_interpreter.TritonBackend, "forward", fails)
    assert generate() == ("torch", expected)


def test_the_cpu_backend_alone_packs_the_linears_and_binds_the_one_call_decode_step(tiny_model, monkeypatch):
    """What a CPU worker runs besides attention is the `cpu` backend's (`prepare`): the packed linears
    and the one-call decode step, which attends with the C kernel itself. Under any other backend
    (chosen, or fallen back to) every step goes through that backend and torch's own linears."""
    from serving.config import EngineConfig
    from serving.engine import kernels
    from serving.engine.llm import LLMEngine
    from serving.engine.models.cpu_linear import PackedLinear

    if kernels.load("decode_layers") is None:
        pytest.skip("no C compiler: kernels off")

    def prepared(backend: str) -> tuple[int, bool]:
        monkeypatch.setenv("EPD_ATTENTION_BACKEND", backend)
        engine = LLMEngine(EngineConfig(model=str(tiny_model), device="cpu", num_kv_blocks=16, block_size=8))
        model = engine.runner.model
        packed = sum(isinstance(m, PackedLinear) for m in model.modules())
        return packed, model.model.decode_layers is not None

    packed, one_call = prepared("cpu")
    assert packed > 0 and one_call
    assert prepared("torch") == (0, False)


def test_only_the_cpu_backend_runs_the_element_wise_kernels(tiny_model, monkeypatch):
    """The layers' norms, rotary embedding and gated product run as their backend runs them: the C
    kernels under `cpu`, torch's ops under `torch` on the same CPU (no kernel call at all), and the
    greedy tokens are the same."""
    from collections import Counter

    from serving.config import EngineConfig
    from serving.engine import kernels
    from serving.engine.kernels import fused
    from serving.engine.llm import LLMEngine
    from serving.types import SamplingParams

    if kernels.load("fused_ops") is None:
        pytest.skip("no C compiler: kernels off")
    calls: Counter[str] = Counter()

    def counting(name: str):  # noqa: ANN202
        real = getattr(fused, name)

        def counted(*args):  # noqa: ANN002, ANN202
            calls[name] += 1
            return real(*args)

        return counted

    for name in ("add_rms_norm", "rotary_", "silu_mul"):
        monkeypatch.setattr(fused, name, counting(name))

    def generate(backend: str) -> tuple[dict[str, int], list[int]]:
        calls.clear()
        monkeypatch.setenv("EPD_ATTENTION_BACKEND", backend)
        engine = LLMEngine(EngineConfig(model=str(tiny_model), device="cpu", num_kv_blocks=16, block_size=8))
        prompt = engine.inputs.from_user_prompt("the river at night", [])
        out = engine.generate([(prompt, SamplingParams(max_tokens=4, ignore_eos=True))])[0].token_ids
        return dict(calls), out

    on_cpu, tokens = generate("cpu")
    assert set(on_cpu) == {"add_rms_norm", "rotary_", "silu_mul"}
    assert generate("torch") == ({}, tokens)
