"""A decode-only step's decoder layers as one C call (`kernels/decode_layers.c`).

At a decode step's few rows each layer is ten kernel calls of tens of microseconds, and the Python
around each (argument checks, output tensors, ctypes) costs about as much: in bfloat16 at one request
the step took 2.8 ms through the modules and takes 1.8 ms through this call. `DecodeLayers` binds the
decoder's weights once (the few-row kernel's packed copies, the norms, the pool's layout) and runs every
layer with the same kernels in the same order on buffers of the same types, so its output, and the keys
and values it writes, are those of the layer modules to the bit.

It runs only where every one of those kernels would have run for these rows (`FEW_ROWS` or fewer, one
thread or the kernel's OpenMP build, float32 or bfloat16 on the CPU, a batch of decode tokens only);
anything else returns None and the modules run.
"""

from __future__ import annotations

import ctypes
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from serving.engine import kernels
from serving.engine.attention import AttentionBatch
from serving.engine.kernels import small_linear
from serving.engine.kernels.decode_layers import Layer, Ops, Shape, address
from serving.engine.kv_cache import KVPool
from serving.engine.models import cpu_linear
from serving.engine.models.cpu_linear import PackedLinear
from serving.engine.models.layers import GatedMLP

if TYPE_CHECKING:
    from serving.engine.models.decoder import Decoder  # which holds one of these


def _few_rows(linear: object, bf16: bool) -> tuple[int, int] | None:
    """The packed weight and bias pointers of a linear that has the few-row kernel's copy."""
    if not isinstance(linear, PackedLinear) or linear.few_rows is None:
        return None
    few = linear.few_rows
    if few.dtype != (torch.bfloat16 if bf16 else torch.float32):
        return None
    return few.packed.data_ptr(), 0 if few.bias is None else few.bias.data_ptr()


class DecodeLayers:
    """The decoder's layers and final norm bound for one C call per decode step (see the module doc)."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        ops: Ops,
        shape: Shape,
        layers: ctypes.Array,
        final_norm: torch.Tensor,
        keep: list[torch.Tensor],
    ) -> None:
        self._lib = lib
        self._fn = lib.epd_decode_layers
        self._ops = ops
        self._shape = shape
        self._layers = layers
        self._num_layers = len(layers)
        self._final_norm = final_norm.data_ptr()
        self._keep = [*keep, final_norm]  # the tensors whose memory the pointers above name
        self.dtype = torch.bfloat16 if shape.bf16 else torch.float32
        self.parallel = small_linear.parallel()
        self.calls = 0  # steps run here (tests check that this path, not the modules', ran)

    @classmethod
    def build(cls, decoder: Decoder) -> DecodeLayers | None:
        """Bound to `decoder` (after loading, fusing and packing), or None where any layer would not
        take the kernels: then the modules run every step."""
        dtype = decoder.norm.weight.dtype
        if dtype not in (torch.float32, torch.bfloat16) or decoder.norm.weight.device.type != "cpu":
            return None
        bf16 = dtype == torch.bfloat16
        lib, fused, attend, linear = (
            kernels.load(n) for n in ("decode_layers", "fused_ops", "paged_decode", "small_linear")
        )
        if lib is None or fused is None or attend is None or linear is None:
            return None
        suffix = "_bf16" if bf16 else ""
        ops = Ops(
            address(linear.epd_small_linear),
            address(getattr(fused, "epd_add_rms_norm" + suffix)),
            address(getattr(fused, "epd_rotary" + suffix)),
            address(getattr(fused, "epd_silu_mul" + suffix)),
            address(fused.epd_write_kv),
            address(attend.epd_paged_decode),
        )
        cfg = decoder.cfg
        keep: list[torch.Tensor] = []
        bound = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if not isinstance(mlp, GatedMLP) or mlp.gate_up is None or mlp.act is not F.silu:
                return None
            parts = [_few_rows(p, bf16) for p in (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down_proj)]
            if any(p is None for p in parts):
                return None
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            if any(n.dtype != dtype or not n.is_contiguous() for n in norms):
                return None
            keep.extend(norms)
            (qkv, qkv_b), (o, o_b), (gu, gu_b), (down, down_b) = parts  # type: ignore[misc]
            bound.append(
                Layer(norms[0].data_ptr(), qkv, qkv_b, o, o_b, norms[1].data_ptr(), gu, gu_b, down, down_b)
            )
        if not decoder.norm.weight.is_contiguous():
            return None
        shape = Shape(
            hidden=cfg.hidden_size,
            heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            intermediate=cfg.intermediate_size,
            eps=cfg.rms_norm_eps,
            scale=1.0 / math.sqrt(cfg.head_dim),
            bf16=int(bf16),
        )
        return cls(lib, ops, shape, (Layer * len(bound))(*bound), decoder.norm.weight, keep)

    def __call__(
        self, embeds: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: KVPool, batch: AttentionBatch
    ) -> torch.Tensor | None:
        """The final norm's output (rows, hidden) for a batch of decode tokens, every layer's keys and
        values written to `pool`; None (nothing written) where the modules must run instead."""
        rows = embeds.shape[0]
        group = batch.decode
        if group is None or batch.prompt is not None or group.rows is not None or rows > cpu_linear.FEW_ROWS:
            return None
        threads = torch.get_num_threads()
        if threads > 1 and not self.parallel:
            return None
        data = pool.data
        if embeds.dtype != self.dtype or data.dtype != self.dtype or not embeds.is_contiguous():
            return None
        shape = self._shape
        if data.device.type != "cpu" or data.shape[4:] != (shape.kv_heads, shape.head_dim):
            return None
        if data.stride(5) != 1 or data.stride(4) != data.shape[5]:
            return None
        if not (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == sin.dtype == self.dtype):
            return None
        if cos.numel() != rows * shape.head_dim or sin.numel() != rows * shape.head_dim:
            return None
        shape.layer_stride, shape.block_stride = data.stride(1), data.stride(0)
        shape.kind_stride, shape.slot_stride, shape.block_size = data.stride(2), data.stride(3), data.shape[3]
        work = torch.empty(self._lib.epd_decode_layers_work(shape, rows), dtype=torch.uint8)
        out = torch.empty_like(embeds)
        status = self._fn(
            self._ops,
            shape,
            self._layers,
            self._num_layers,
            self._final_norm,
            embeds.data_ptr(),
            rows,
            cos.data_ptr(),
            sin.data_ptr(),
            data.data_ptr(),
            batch.slot_blocks.data_ptr(),
            batch.slot_offsets.data_ptr(),
            group.block_index.data_ptr(),
            group.block_starts.data_ptr(),
            group.ctx.data_ptr(),
            threads,
            kernels.decode_threads(group.ctx),
            work.data_ptr(),
            out.data_ptr(),
        )
        if status != 0:
            return None
        self.calls += 1
        return out
