"""The few-row linear kernel (`small_linear.c`) computes what `F.linear` does, for any shape it is
given, and the packed linears send decode-sized batches to it only where it runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from serving.engine import kernels
from serving.engine.kernels import fused, small_linear
from serving.engine.models import cpu_linear
from serving.engine.models.cpu_linear import PackedLinear, pack_linears, packing_available

DTYPES = [torch.float32, torch.bfloat16]


def runs(dtype: torch.dtype) -> bool:
    return small_linear.supported(torch.empty(0, dtype=dtype))


def error_against_float64(y: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> float:
    bias = None if linear.bias is None else linear.bias.double()
    return (y.double() - F.linear(x.double(), linear.weight.double(), bias)).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("k", "n"),
    # Groups of 64 columns whole and cut short, a K that is odd (bfloat16 pairs), and the small
    # model's shapes.
    [(64, 48), (33, 17), (7, 130), (512, 640), (1408, 512)],
)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 32])
def test_kernel_is_the_linear_within_its_rounding(dtype: torch.dtype, k: int, n: int, rows: int) -> None:
    """Against float64, the kernel's error is at most twice `F.linear`'s own in the same dtype: the
    two differ only in summation order (and, in bfloat16, where the float32 sums are rounded)."""
    if not runs(dtype):
        pytest.skip(f"the kernel does not run {dtype} on this CPU")
    torch.manual_seed(rows * 1000 + k + n)
    for bias in (True, False):
        linear = nn.Linear(k, n, bias=bias).to(dtype).requires_grad_(False)
        x = torch.randn(rows, k).to(dtype)
        y = small_linear.FewRows(linear.weight, linear.bias)(x)
        assert y is not None and y.shape == (rows, n) and y.dtype == dtype
        ours, torchs = error_against_float64(y, x, linear), error_against_float64(linear(x), x, linear)
        assert ours <= max(2 * torchs, 1e-5), (ours, torchs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_reads_rows_with_a_stride_and_writes_every_column(dtype: torch.dtype) -> None:
    """x may be a view into wider rows (a slice of a fused projection's output); every output column
    is written, including the last group's partial ones, and none past N."""
    if not runs(dtype):
        pytest.skip(f"the kernel does not run {dtype} on this CPU")
    torch.manual_seed(0)
    linear = nn.Linear(40, 70).to(dtype).requires_grad_(False)
    wide = torch.randn(5, 57).to(dtype)
    x = wide[:, 3:43]
    assert x.stride(0) == 57
    y = small_linear.FewRows(linear.weight, linear.bias)(x)
    assert y is not None and torch.isfinite(y.float()).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y, linear(x.contiguous()), rtol=tol, atol=tol)


def test_kernel_declines_what_it_cannot_run() -> None:
    assert not small_linear.supported(torch.empty(0, dtype=torch.float16))
    assert not small_linear.supported(torch.empty(0, dtype=torch.float64))
    if not runs(torch.float32):
        pytest.skip("the kernel does not run float32 on this CPU")
    few = small_linear.FewRows(torch.randn(16, 8), None)
    assert few(torch.randn(2, 8, dtype=torch.float64)) is None
    assert few(torch.randn(2, 8).bfloat16()) is None  # not the weight's dtype
    assert few(torch.randn(2, 9)) is None  # not the weight's input size
    assert few(torch.randn(3, 2, 8)) is None
    assert few(torch.randn(2, 8)) is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_split_the_columns_and_change_no_bit(dtype: torch.dtype) -> None:
    """Each group of 64 columns is summed by one thread in the same order whatever the thread count,
    so a split call gives exactly the one-thread result (more threads than groups included)."""
    if not runs(dtype):
        pytest.skip(f"the kernel does not run {dtype} on this CPU")
    torch.manual_seed(1)
    for n in (70, 640):
        linear = nn.Linear(512, n).to(dtype).requires_grad_(False)
        few = small_linear.FewRows(linear.weight, linear.bias)
        x = torch.randn(5, 512).to(dtype)
        one = few(x, 1)
        for threads in (2, 3, 16):
            assert torch.equal(few(x, threads), one)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_linear_takes_few_rows_to_the_kernel(
    dtype: torch.dtype, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most FEW_ROWS rows go to the kernel, with torch's thread count; with several threads only
    when the kernel can split a call (built with OpenMP), else oneDNN's split matmul runs them."""
    linear = nn.Linear(64, 96).to(dtype).requires_grad_(False)
    if not (packing_available(linear.weight) and runs(dtype)):
        pytest.skip("oneDNN packing or the kernel is not available here")
    calls: list[tuple[int, int]] = []
    kernel = small_linear.FewRows.__call__

    def counted(self: small_linear.FewRows, x: torch.Tensor, threads: int = 1) -> torch.Tensor | None:
        calls.append((x.shape[0], threads))
        return kernel(self, x, threads)

    monkeypatch.setattr(small_linear.FewRows, "__call__", counted)
    packed = PackedLinear(linear, few_rows=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 4, cpu_linear.FEW_ROWS, cpu_linear.FEW_ROWS + 1, 300):
            x = torch.randn(rows, 64).to(dtype)
            torch.testing.assert_close(packed(x), linear(x), rtol=tol, atol=tol)
    finally:
        torch.set_num_threads(before)
    taken = threads == 1 or small_linear.parallel()
    assert calls == ([(1, threads), (4, threads), (cpu_linear.FEW_ROWS, threads)] if taken else [])
    assert PackedLinear(linear).few_rows is None  # no copy unless asked for


def test_a_build_without_openmp_still_runs_on_one_thread(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Where the OpenMP build fails (here: a flag no compiler knows), the plain build loads instead;
    the kernel then says it does not split calls, and still computes the linear."""
    if kernels.load("small_linear") is None:
        pytest.skip("no C compiler: kernels off")
    monkeypatch.setenv("EPD_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(kernels._VARIANTS, "small_linear", (("-fno-such-flag-anywhere",), ()))
    monkeypatch.delitem(kernels._libraries, "small_linear")
    assert kernels.load("small_linear") is not None
    assert not small_linear.parallel()
    if runs(torch.float32):
        linear = nn.Linear(32, 20).requires_grad_(False)
        x = torch.randn(3, 32)
        torch.testing.assert_close(small_linear.FewRows(linear.weight, linear.bias)(x), linear(x))


def test_a_build_that_does_not_load_gives_way_to_the_next_or_to_torch(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A shared object that builds but will not load (here: not an ELF file) is skipped: the next
    variant loads, and a source with none left gives its callers None (their torch path)."""
    if kernels.load("small_linear") is None or not small_linear.parallel():
        pytest.skip("no OpenMP build here to break")
    kernels.load("fused_ops")  # loaded now, so the library the other tests use comes back after this one
    monkeypatch.setenv("EPD_CACHE_DIR", str(tmp_path))
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not a shared object")
    build = kernels._build
    monkeypatch.setattr(kernels, "_build", lambda source, extra=(): broken if extra else build(source, extra))
    monkeypatch.delitem(kernels._libraries, "small_linear")
    monkeypatch.delitem(kernels._libraries, "fused_ops")
    assert kernels.load("small_linear") is not None
    assert not small_linear.parallel()  # the OpenMP variant was the broken one
    monkeypatch.setattr(kernels, "_build", lambda source, extra=(): broken)
    assert kernels.load("fused_ops") is None
    assert fused.silu_mul(torch.randn(2, 8)) is None


def test_pack_linears_copies_only_the_decode_modules_and_only_while_memory_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = nn.ModuleDict(
        {"vision": nn.Sequential(nn.Linear(16, 16)), "decoder": nn.Sequential(nn.Linear(16, 32))}
    )
    model["head"] = nn.Linear(32, 8)
    if not (packing_available(model["head"].weight) and runs(torch.float32)):
        pytest.skip("oneDNN packing or the kernel is not available here")
    assert pack_linears(model, few_rows=(model["decoder"], model["head"])) == 3
    assert model["vision"][0].few_rows is None
    assert model["decoder"][0].few_rows is not None and model["head"].few_rows is not None

    small = nn.ModuleDict({"decoder": nn.Sequential(nn.Linear(16, 32))})
    monkeypatch.setattr(cpu_linear, "_memory_bytes", lambda: 1000)  # the copies would not fit
    assert pack_linears(small, few_rows=(small["decoder"],)) == 1
    assert isinstance(small["decoder"][0], PackedLinear) and small["decoder"][0].few_rows is None


def test_the_memory_budget_is_the_containers_limit_where_lower(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A pod's cgroup limit, not the node's memory, bounds the few-row copies; "max" means no limit."""
    limit = tmp_path / "memory.max"
    monkeypatch.setattr(cpu_linear, "_CGROUP_LIMITS", (tmp_path / "absent",))
    machine = cpu_linear._memory_bytes()
    assert machine > 2**30
    monkeypatch.setattr(cpu_linear, "_CGROUP_LIMITS", (limit,))
    limit.write_text("max\n")
    assert cpu_linear._memory_bytes() == machine
    limit.write_text(f"{2**30}\n")
    assert cpu_linear._memory_bytes() == 2**30
