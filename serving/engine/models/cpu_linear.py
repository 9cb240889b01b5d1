"""Linear layers whose weights oneDNN has reordered once, at load, into its blocked layout (CPU only).

`F.linear` hands MKL or oneDNN a plain row-major weight, and the library re-blocks it on every call;
for the decode step's small batches that re-blocking is a large part of the call. Packed once, the
same matmuls ran 1.3-1.6x faster at 1-16 rows and about 1.1x at 512, in float32 and bfloat16 alike
(measured here, one thread, the `small` model's shapes). This is the same oneDNN path that
`torch.compile`'s CPU backend (and vLLM's CPU backend) take for linears, without a compile step.

Decode steps' few rows go to a C kernel instead (`kernels/small_linear.c`), which reads a second copy
of the weights packed for it: with one to a few rows a linear is a pass over its weights, and that
kernel streams them at about twice oneDNN's rate.

Results differ from `F.linear` only in float32 summation order (about 1e-6 relative). `EPD_CPU_KERNELS=0`
turns this off together with the C kernels.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from serving.config import cpu_kernels_enabled
from serving.engine.kernels import small_linear

# The row count oneDNN tunes the packed layout for. Measured: the layout serves any row count, and the
# hint moves speed by a few percent at most; decode's batch sizes are the latency-critical ones.
_ROWS_HINT = 16

# In float32, oneDNN ran 1-3 rows through a slower path than 4: the small model's 25 decoder linears
# took 5.2 ms per step at 1 or 2 rows and 4.0 ms at 4 (one thread, AVX-512). Fewer rows are padded to
# this many; the extra rows' arithmetic is free beside reading the weights. bfloat16 showed no such step.
_MIN_ROWS_F32 = 4


# The most rows the few-row kernel takes. Measured against the packed oneDNN matmul over the `small`
# model's 24 decoder linears and LM head in sequence (weights 71 MB in float32, 35 MB in bfloat16, one
# thread): float32 2.2-2.9 against 3.6-4.2 ms at 1-4 rows, 5.8 against 6.7-7.0 at 16, 10.6-11.0
# against 11.6-11.9 at 32, even from 256 rows; bfloat16 0.9-1.1 against 1.8-2.2 ms at 1-4, 3.0-3.2
# against 3.6-4.0 at 16, 5.5-5.9 against 6.3-6.6 at 32, even from 256. With two threads (OpenMP):
# float32 2.0 against 2.9 ms at one row, 1.6 against 2.4 at 4, 3.4 against 4.0 at 16, 5.9 against 6.5
# at 32; bfloat16 0.5 against 1.2, 0.6 against 1.3, 1.7 against 2.3, 3.0 against 3.6. From 33 to 64
# rows (a decode batch up to the default max_num_seqs) it stays ahead, one thread / two: float32 15.7
# against 15.9 / 8.6 against 9.4 ms at 40, 22.4 against 22.9 / 12.6 against 13.2 at 64; bfloat16 7.9
# against 8.2 / 3.9 against 4.5 at 40, 11.7 against 13.0 / 6.6 against 6.9 at 64. Prefill chunks
# (hundreds of rows) stay on oneDNN.
FEW_ROWS = 64

# The few-row copies of the weights are made only while, all together, they take at most this share
# of the memory this process may use (`_memory_bytes`): for the small models the CPU path serves they
# are megabytes, and a large checkpoint on CPU keeps its memory for the KV cache instead.
_COPY_SHARE = 1 / 8


def packing_available(weight: torch.Tensor) -> bool:
    return (
        cpu_kernels_enabled()
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, few_rows: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.few_rows = (
            small_linear.FewRows(weight, self.bias) if few_rows and small_linear.supported(weight) else None
        )
        # Built without OpenMP the kernel runs on one thread, and oneDNN's split matmul is then faster.
        self.any_threads = self.few_rows is not None and small_linear.parallel()

    # nn.Module's __call__ (hook bookkeeping) cost about as much as the kernel's call on a decode step's
    # small matrices; nothing registers hooks on these layers.
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.few_rows is not None and rows <= FEW_ROWS:
            threads = torch.get_num_threads()
            if threads == 1 or self.any_threads:
                y = self.few_rows(x, threads)
                if y is not None:
                    return y
        if x.dim() == 2 and rows < _MIN_ROWS_F32 and x.dtype == torch.float32:
            padded = x.new_zeros(_MIN_ROWS_F32, x.shape[1])
            padded[:rows] = x
            return self._matmul(padded)[:rows]
        return self._matmul(x.contiguous())

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _linears(module: nn.Module) -> Iterable[tuple[nn.Module, str, nn.Linear]]:
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and packing_available(child.weight):
                yield parent, name, child


# A container's memory limit (cgroup v2, then v1): a pod on KubeRay may be allowed far less than the
# node has, and the copies must fit what this process may use.
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def _memory_bytes() -> int:
    """What this process may use: the machine's memory, or its container's limit where lower."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit
            total = min(total, int(text))
        break
    return total


def pack_linears(module: nn.Module, few_rows: Iterable[nn.Module] = ()) -> int:
    """Replace every `nn.Linear` under `module` (in place) by a `PackedLinear`, where the weight's
    device and dtype allow it; those under `few_rows` (the modules decode steps run: the decoder and
    the LM head) also get the few-row kernel's copy, memory allowing (`_COPY_SHARE`). Returns how many
    were packed."""
    ids = {id(m) for part in few_rows for m in part.modules() if isinstance(m, nn.Linear)}
    found = list(_linears(module))
    copies = sum(c.weight.nbytes for _, _, c in found if id(c) in ids)
    with_copies = copies <= _COPY_SHARE * _memory_bytes()
    for parent, name, child in found:
        setattr(parent, name, PackedLinear(child, few_rows=with_copies and id(child) in ids))
    return len(found)
