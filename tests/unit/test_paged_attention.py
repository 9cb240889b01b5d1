"""The packed paged attention equals plain attention over each sequence's dense context, on random
ragged batches mixing decode tokens, whole prompts and chunks that continue a partly cached prompt."""

from __future__ import annotations

import math
import random

import pytest
import torch

from serving.engine import kernels
from serving.engine.attention import AttentionBatch, paged_attention
from serving.engine.backends.torch_sdpa import TorchBackend

HEADS, KV_HEADS, DIM, BLOCK = 8, 2, 16, 4


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q (q_len, H, D) at the last q_len positions of keys/values (ctx, KV, D): causal softmax attention."""
    q_len, ctx = q.shape[0], keys.shape[0]
    group = HEADS // KV_HEADS
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # (H, ctx, D)
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(DIM)  # (H, q_len, ctx)
    q_pos = torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(q_len, HEADS * DIM)


@pytest.mark.parametrize("seed", range(6))
def test_packed_attention_equals_dense_reference(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = 96
    layer = torch.randn(num_blocks, 2, BLOCK, KV_HEADS, DIM, dtype=torch.float64)
    k_cache, v_cache = layer[:, 0], layer[:, 1]
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered, out-of-order block tables
    q_lens, ctx_lens, tables = [], [], []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["decode", "prompt", "chunk"])
        ctx = rng.randint(1, 40)
        q_len = {"decode": 1, "prompt": ctx, "chunk": rng.randint(1, ctx)}[kind]
        n = -(-ctx // BLOCK) + rng.randint(0, 2)  # tables may hold spare blocks past the context
        tables.append([free.pop() for _ in range(n)])
        q_lens.append(q_len)
        ctx_lens.append(ctx)
    total = sum(q_lens)
    q = torch.randn(total, HEADS, DIM, dtype=torch.float64)
    k = torch.randn(total, KV_HEADS, DIM, dtype=torch.float64)
    v = torch.randn(total, KV_HEADS, DIM, dtype=torch.float64)
    before_k = k_cache.clone()

    batch = AttentionBatch.build(q_lens, ctx_lens, tables, BLOCK, torch.device("cpu"))
    out = paged_attention(q, k, v, layer, batch)

    t = 0
    for q_len, ctx, table in zip(q_lens, ctx_lens, tables, strict=True):
        rows = (
            torch.tensor([table[p // BLOCK] for p in range(ctx)]),
            torch.tensor([p % BLOCK for p in range(ctx)]),
        )
        keys, values = k_cache[rows], v_cache[rows]
        # The new tokens landed in their slots; what was cached before them is untouched.
        assert torch.equal(keys[ctx - q_len :], k[t : t + q_len])
        assert torch.equal(values[ctx - q_len :], v[t : t + q_len])
        assert torch.equal(keys[: ctx - q_len], before_k[rows][: ctx - q_len])
        torch.testing.assert_close(out[t : t + q_len], reference(q[t : t + q_len], keys, values))
        t += q_len


def test_wrong_context_differs_from_reference() -> None:
    """Negative control: attending over one token fewer than the context changes the output."""
    torch.manual_seed(0)
    layer = torch.randn(8, 2, BLOCK, KV_HEADS, DIM, dtype=torch.float64)
    q = torch.randn(1, HEADS, DIM, dtype=torch.float64)
    k = torch.randn(1, KV_HEADS, DIM, dtype=torch.float64)
    v = torch.randn(1, KV_HEADS, DIM, dtype=torch.float64)
    table = [5, 2, 7]
    full = paged_attention(q, k, v, layer.clone(), AttentionBatch.build([1], [10], [table], BLOCK, q.device))
    short = paged_attention(q, k, v, layer.clone(), AttentionBatch.build([1], [9], [table], BLOCK, q.device))
    assert not torch.allclose(full, short)


# -- the C decode kernel ----------------------------------------------------------------------------

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the kernel is off here")


def _decode_case(
    seed: int, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block: int, longest: int = 150
):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_blocks = 200 if longest <= 150 else 9 * -(-longest // block)
    layer = torch.randn(num_blocks, 2, block, kv_heads, dim).to(dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    ctx_lens = [rng.randint(1, longest) for _ in range(rng.randint(1, 9))]
    tables = [[free.pop() for _ in range(-(-c // block))] for c in ctx_lens]
    q = torch.randn(len(ctx_lens), heads, dim).to(dtype)
    return layer, ctx_lens, tables, q


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block"),
    [
        (8, 2, 64, 16),
        (4, 4, 128, 16),  # one head per kv head: 16 keys a tile
        (12, 2, 16, 4),  # 6 heads per kv head: a tile's lanes are not all used
        (6, 3, 24, 8),  # a head size the vector paths do not take
        (16, 2, 64, 16),  # 8 heads per kv head, the largest tile group
        (14, 2, 128, 16),  # 7 per kv head at 128 dims
        (10, 2, 64, 8),  # 5 per kv head: tiles of 3 keys
        (24, 2, 32, 16),  # 12 per kv head: split into two groups of 6
        (9, 3, 256, 16),  # a head size past the bfloat16 tiles' queries
        (8, 2, 64, 5),  # an odd block size: a pair of keys may straddle two blocks
        (8, 2, 64, 12),  # an even block size that is not a power of two
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_kernel_equals_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block: int, threads: int
) -> None:
    """The kernel reads blocks in place and matches dense attention over each sequence's context, for
    float32 and bfloat16 pools, grouped and plain heads, head sizes it vectorises and ones it does not,
    and when it splits sequences across threads."""
    layer, ctx_lens, tables, q = _decode_case(threads * 100 + dim, dtype, heads, kv_heads, dim, block)
    _check_decode(kernels.paged_decode, layer, ctx_lens, tables, q, block, threads)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block"), [(8, 2, 64, 16), (6, 3, 24, 8)])
def test_decode_kernel_equals_reference_over_contexts_of_several_units(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block: int
) -> None:
    """Contexts longer than one work unit (about 256 tokens): the units' partial outputs are merged by
    their maxima and sums; a context of one token, one unit and several units in one call."""
    layer, ctx_lens, tables, q = _decode_case(7 + dim, dtype, heads, kv_heads, dim, block, longest=1100)
    _check_decode(kernels.paged_decode, layer, ctx_lens, tables, q, block, 1)


@pytest.mark.parametrize("source", ["paged_decode", "paged_prefill"])
def test_kernels_without_avx512_equal_reference(source: str, tmp_path, monkeypatch) -> None:
    """The portable build (here: x86-64-v3, no AVX-512) compiles and gives the same attention: a CPU
    without AVX-512 must not silently lose the kernel."""
    import ctypes
    import platform
    from pathlib import Path

    if platform.machine() != "x86_64" or kernels.library() is None:
        pytest.skip("needs an x86-64 C compiler")
    monkeypatch.setenv("EPD_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(
        kernels, "_COMPILE", [f if f != "-march=native" else "-march=x86-64-v3" for f in kernels._COMPILE]
    )
    path = kernels._build(Path(kernels.__file__).with_name(f"{source}.c"))
    assert path is not None
    lib = ctypes.CDLL(str(path))
    kernels._SOURCES[source](lib)
    monkeypatch.setitem(kernels._libraries, source, lib)
    for dtype in (torch.float32, torch.bfloat16):
        if source == "paged_decode":
            layer, ctx_lens, tables, q = _decode_case(11, dtype, 8, 2, 64, 16, longest=700)
            _check_decode(kernels.paged_decode, layer, ctx_lens, tables, q, 16, 1)
        else:
            _check_prefill(_prefill_case(11, dtype, 8, 2, 64, 16), 16, 1)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 5])
def test_decode_kernel_ignores_what_lies_past_each_context(dtype: torch.dtype, block: int) -> None:
    """Slots past a context's end (the rest of its last block) hold whatever an earlier sequence
    left there, NaN included: the output depends on the context alone. Odd contexts leave the last
    key pair half outside."""
    layer, ctx_lens, tables, q = _decode_case(11, dtype, 8, 2, 64, block)
    used = torch.zeros(layer.shape[:3], dtype=torch.bool)
    for ctx, table in zip(ctx_lens, tables, strict=True):
        for p in range(ctx):
            used[table[p // block], :, p % block] = True
    layer[~used] = float("nan")
    _check_decode(kernels.paged_decode, layer, ctx_lens, tables, q, block, 1)


def _check_decode(paged_decode, layer, ctx_lens, tables, q, block: int, threads: int) -> None:  # noqa: ANN001
    heads, dim, kv_heads = q.shape[1], q.shape[2], layer.shape[3]
    batch = AttentionBatch.build([1] * len(ctx_lens), ctx_lens, tables, block, torch.device("cpu"))
    group = batch.decode
    out = paged_decode(
        q.float().contiguous(),
        layer,
        group.block_index,
        group.block_starts,
        group.ctx,
        1 / math.sqrt(dim),
        threads=threads,
    )
    assert out is not None
    for i, (ctx, table) in enumerate(zip(ctx_lens, tables, strict=True)):
        rows = (
            torch.tensor([table[p // block] for p in range(ctx)]),
            torch.tensor([p % block for p in range(ctx)]),
        )
        keys, values = layer[:, 0][rows].double(), layer[:, 1][rows].double()
        g = heads // kv_heads
        k = keys.repeat_interleave(g, dim=1).transpose(0, 1)
        v = values.repeat_interleave(g, dim=1).transpose(0, 1)
        scores = (q[i].double()[:, None, :] @ k.transpose(1, 2)) / math.sqrt(dim)
        expected = (scores.softmax(-1) @ v)[:, 0]
        if layer.dtype == torch.float32:
            torch.testing.assert_close(out[i].double(), expected, rtol=1e-4, atol=1e-5)
            continue
        # A bfloat16 pool on AVX512-BF16 multiplies in bfloat16 (the weights rounded), as torch's
        # bfloat16 attention does: no further from float64 than that path's output.
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q[i][None, :, None].to(layer.dtype),
            keys.to(layer.dtype).transpose(0, 1)[None],
            values.to(layer.dtype).transpose(0, 1)[None],
            enable_gqa=True,
        )[0, :, 0]
        torch_error = (sdpa.double() - expected).abs().max().item()
        assert (out[i].double() - expected).abs().max().item() <= max(torch_error, 1e-3)
        torch.testing.assert_close(out[i].double(), expected, rtol=1e-2, atol=1e-2)


def _prefill_case(seed: int, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block: int):
    """A batch of whole prompts, chunks after cached tokens and decode tokens, contexts up to a few key
    tiles long; the pool and the queries in `dtype`."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    q_lens, ctx_lens = [], []
    for i in range(rng.randint(3, 7)):
        kind = "chunk" if i == 0 else rng.choice(["prompt", "chunk", "decode", "short"])
        ctx = rng.randint(1, 12) if kind == "short" else rng.randint(40, 300)
        q_len = 1 if kind == "decode" else rng.randint(2, ctx) if kind == "chunk" else ctx
        q_lens.append(q_len)
        ctx_lens.append(ctx)
    num_blocks = sum(-(-c // block) for c in ctx_lens) + 8
    layer = torch.randn(num_blocks, 2, block, kv_heads, dim).to(dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-c // block))] for c in ctx_lens]
    q = torch.randn(sum(q_lens), heads, dim).to(dtype)
    return layer, q_lens, ctx_lens, tables, q


def _check_prefill(case, block: int, threads: int) -> None:  # noqa: ANN001
    """The kernel over the batch's prompt group equals float64 attention for the group's rows and
    leaves every other row (the decode tokens') as it was."""
    layer, q_lens, ctx_lens, tables, q = case
    heads, dim = q.shape[1], q.shape[2]
    batch = AttentionBatch.build(q_lens, ctx_lens, tables, block, torch.device("cpu"))
    group = batch.prompt
    assert group is not None
    out = torch.full(q.shape, float("nan"))
    ran = kernels.paged_prefill(
        q.float().contiguous(),
        layer,
        group.block_index,
        group.block_starts,
        group.ctx,
        group.first_rows,
        group.row_counts,
        1 / math.sqrt(dim),
        out,
        threads=threads,
    )
    assert ran
    t = 0
    for q_len, ctx, table in zip(q_lens, ctx_lens, tables, strict=True):
        rows = out[t : t + q_len]
        if q_len == 1:
            assert rows.isnan().all()  # a decode token's row: not the prompt group's, left alone
        else:
            slots = (
                torch.tensor([table[p // block] for p in range(ctx)]),
                torch.tensor([p % block for p in range(ctx)]),
            )
            keys, values = layer[:, 0][slots].double(), layer[:, 1][slots].double()
            g = heads // layer.shape[3]
            k = keys.repeat_interleave(g, dim=1).transpose(0, 1)
            v = values.repeat_interleave(g, dim=1).transpose(0, 1)
            scores = q[t : t + q_len].double().transpose(0, 1) @ k.transpose(1, 2) / math.sqrt(dim)
            later = torch.arange(ctx)[None, :] > torch.arange(ctx - q_len, ctx)[:, None]
            expected = (scores.masked_fill(later, float("-inf")).softmax(-1) @ v).transpose(0, 1)
            if layer.dtype == torch.float32:
                torch.testing.assert_close(rows.double(), expected, rtol=1e-4, atol=1e-5)
            else:
                # With AVX512-BF16 the kernel multiplies in bfloat16 (the softmax weights rounded), as
                # torch's bfloat16 attention does: no further from float64 than that path's output.
                sdpa = torch.nn.functional.scaled_dot_product_attention(
                    q[t : t + q_len].transpose(0, 1)[None],
                    keys.to(layer.dtype).transpose(0, 1)[None],
                    values.to(layer.dtype).transpose(0, 1)[None],
                    attn_mask=~later,
                    enable_gqa=True,
                )[0].transpose(0, 1)
                torch_error = (sdpa.double() - expected).abs().max().item()
                assert (rows.double() - expected).abs().max().item() <= max(torch_error, 1e-3)
                torch.testing.assert_close(rows.double(), expected, rtol=1e-2, atol=1e-2)
        t += q_len


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block"),
    # vectorised head sizes (64, 128; 7 heads per kv head pad a tile's rows to a multiple of 16) and a
    # scalar one (24)
    [(8, 2, 64, 16), (4, 4, 128, 16), (14, 2, 32, 8), (6, 3, 24, 8)],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_kernel_equals_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, block: int, threads: int
) -> None:
    """Causal attention of whole prompts and of chunks after cached tokens, read from blocks in place:
    several query and key tiles per sequence, tiles that cross the diagonal, contexts of a few tokens,
    float32 and bfloat16 pools, tiles split across threads."""
    for seed in range(3):
        case = _prefill_case(seed * 10 + threads + dim, dtype, heads, kv_heads, dim, block)
        _check_prefill(case, block, threads)


def test_prefill_kernel_declines_what_it_cannot_run() -> None:
    """A float64 pool gets False (the caller attends with SDPA); an unusable output buffer is refused
    rather than written elsewhere."""
    layer = torch.randn(4, 2, BLOCK, KV_HEADS, DIM, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.long)
    zero = torch.zeros(1, dtype=torch.long)
    q = torch.randn(3, HEADS, DIM)
    assert not kernels.paged_prefill(q, layer, zero, zero, one * 3, zero, one * 3, 1.0, torch.empty_like(q))
    if kernels.load("paged_prefill") is not None:
        with pytest.raises(ValueError):
            kernels.paged_prefill(q, layer.float(), zero, zero, one * 3, zero, one * 3, 1.0, q.double())


def _mixed_batch(seed: int, q_lens: list[int], ctx_lens: list[int], blocks_each: int):
    """A float32 pool, new q/k/v rows and the batch for sequences with consecutive block tables."""
    torch.manual_seed(seed)
    tables = [list(range(i * blocks_each, (i + 1) * blocks_each)) for i in range(len(q_lens))]
    layer = torch.randn(len(q_lens) * blocks_each + 4, 2, BLOCK, KV_HEADS, DIM)
    total = sum(q_lens)
    q, k, v = (
        torch.randn(total, HEADS, DIM),
        torch.randn(total, KV_HEADS, DIM),
        torch.randn(total, KV_HEADS, DIM),
    )
    return layer, q, k, v, AttentionBatch.build(q_lens, ctx_lens, tables, BLOCK, torch.device("cpu"))


@needs_kernel
def test_a_prefill_kernel_that_cannot_run_falls_back_to_sdpa(monkeypatch) -> None:
    """Arguments the C side rejects (more queries than context) give False with nothing written; and
    with the kernel unavailable, paged_attention serves the prompt rows through SDPA, to the same
    output."""
    layer = torch.randn(8, 2, BLOCK, KV_HEADS, DIM)
    q = torch.randn(5, HEADS, DIM)
    out = torch.full(q.shape, float("nan"))
    one = torch.ones(1, dtype=torch.long)
    zero = torch.zeros(1, dtype=torch.long)
    blocks = torch.arange(2, dtype=torch.long)
    assert not kernels.paged_prefill(q, layer, blocks, zero, one * 4, zero, one * 5, 1.0, out)
    assert out.isnan().all()

    pool, q, k, v, batch = _mixed_batch(5, [1, 9, 6], [13, 9, 20], 6)
    with_kernel = paged_attention(q, k, v, pool.clone(), batch)
    monkeypatch.setitem(kernels._libraries, "paged_prefill", None)
    without = paged_attention(q, k, v, pool.clone(), batch)
    torch.testing.assert_close(without, with_kernel, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_and_torch_paths_agree_in_a_mixed_batch() -> None:
    """paged_attention sends decode tokens and prompt tokens to their kernels; the batched torch
    backend (SDPA over padded contexts) gives the same step output."""
    layer, q, k, v, batch = _mixed_batch(3, [1, 7, 1, 12, 1], [30, 7, 9, 20, 41], 12)
    with_kernel = paged_attention(q, k, v, layer.clone(), batch)
    expected = TorchBackend().forward(q, k, v, layer.clone(), batch)
    torch.testing.assert_close(with_kernel, expected, rtol=1e-5, atol=1e-5)
    assert batch.decode is not None and batch.decode.rows is not None  # the decode rows were scattered


def test_kernel_declines_what_it_cannot_run() -> None:
    """float64 pools and non-CPU layouts get None, so the caller takes the torch path."""
    layer = torch.randn(4, 2, BLOCK, KV_HEADS, DIM, dtype=torch.float64)
    idx = torch.tensor([0], dtype=torch.long)
    assert (
        kernels.paged_decode(
            torch.randn(1, HEADS, DIM), layer, idx, torch.zeros(1, dtype=torch.long), idx + 1, 1.0
        )
        is None
    )


@needs_kernel
def test_loading_the_kernel_keeps_the_process_floating_point_state() -> None:
    """Linked with -ffast-math, gcc's crtfastmath would set flush-to-zero for the whole process when the
    library loads, and every later float op (torch's, numpy's) would lose subnormals."""
    assert kernels.library() is not None
    assert (torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() != 0.0
    assert (torch.tensor([1e-310], dtype=torch.float64) * 1.0).item() != 0.0


def test_a_missing_or_broken_kernel_source_falls_back(tmp_path, monkeypatch) -> None:
    """An install without the C source, or a source that does not compile, gives no library (the
    torch path runs) rather than an error."""
    monkeypatch.setenv("EPD_CACHE_DIR", str(tmp_path / "cache"))
    assert kernels._build(tmp_path / "missing.c") is None
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    assert kernels._build(broken) is None
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-built was left


def test_kernel_threads_follow_the_work() -> None:
    """A small context runs on one thread (starting threads would cost more than it saves); a large
    one uses torch's intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert kernels.decode_threads(torch.tensor([100, 200])) == 1
        assert kernels.decode_threads(torch.tensor([9000, 9000])) == 4
        assert kernels.decode_threads(torch.tensor([5000, 4000])) == 2
    finally:
        torch.set_num_threads(before)
