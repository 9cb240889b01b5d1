"""Linear layers whose weights oneDNN has reordered once, at load, into its blocked layout (CPU only).

`F.linear` hands MKL or oneDNN a plain row-major weight, and the library re-blocks it on every call;
for the decode step's small batches that re-blocking is a large part of the call. Packed once, the
same matmuls ran 1.3-1.6x faster at 1-16 rows and about 1.1x at 512, in float32 and bfloat16 alike
(measured here, one thread, the `small` model's shapes). This is the same oneDNN path that
`torch.compile`'s CPU backend (and vLLM's CPU backend) take for linears, without a compile step.

Results differ from `F.linear` only in float32 summation order (about 1e-6 relative). `EPD_CPU_KERNELS=0`
turns this off together with the C kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from serving.config import cpu_kernels_enabled

# The row count oneDNN tunes the packed layout for. Measured: the layout serves any row count, and the
# hint moves speed by a few percent at most; decode's batch sizes are the latency-critical ones.
_ROWS_HINT = 16

# In float32, oneDNN ran 1-3 rows through a slower path than 4: the small model's 25 decoder linears
# took 5.2 ms per step at 1 or 2 rows and 4.0 ms at 4 (one thread, AVX-512). Fewer rows are padded to
# this many; the extra rows' arithmetic is free beside reading the weights. bfloat16 showed no such step.
_MIN_ROWS_F32 = 4


def packing_available(weight: torch.Tensor) -> bool:
    return (
        cpu_kernels_enabled()
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _ROWS_HINT)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dim() == 2 and rows < _MIN_ROWS_F32 and x.dtype == torch.float32:
            padded = x.new_zeros(_MIN_ROWS_F32, x.shape[1])
            padded[:rows] = x
            return self._matmul(padded)[:rows]
        return self._matmul(x.contiguous())

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(module: nn.Module) -> int:
    """Replace every `nn.Linear` under `module` (in place) by a `PackedLinear`, where the weight's
    device and dtype allow it. Returns how many were packed."""
    packed = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and packing_available(child.weight):
                setattr(parent, name, PackedLinear(child))
                packed += 1
    return packed
