"""Qwen2-VL and Qwen2.5-VL vision towers: patch embedding, 2-D rotary, (windowed) attention, merger."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serving.engine.backends.pointwise import apply_rotary
from serving.engine.models.config import VisionConfig
from serving.engine.models.layers import ACTIVATIONS, GatedMLP, RMSNorm


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.kernel = torch.Size((cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size))
        self.in_channels = cfg.in_channels
        self.embed_dim = cfg.embed_dim
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, self.kernel, stride=self.kernel, bias=False)
        self.flat: nn.Module | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype if self.flat is None else self._dtype

    def fuse(self) -> None:
        """The convolution as a matmul (after the weights load). Its kernel equals its stride and each
        row of `pixels` is exactly one kernel volume, so conv3d is a linear map of the flattened patch;
        as a matmul it ran about 8x faster on CPU than the convolution (measured, 2x448² images)."""
        weight = self.proj.weight
        self._dtype = weight.dtype
        self.flat = nn.Linear(weight[0].numel(), self.embed_dim, bias=False).to(weight.device, weight.dtype)
        with torch.no_grad():
            self.flat.weight.copy_(weight.reshape(self.embed_dim, -1))
        self.flat.requires_grad_(False)
        del self.proj

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.flat is not None:
            return self.flat(pixels.reshape(-1, self.in_channels * self.kernel.numel()).to(self.dtype))
        x = pixels.view(-1, self.in_channels, *self.kernel).to(self.dtype)
        return self.proj(x).view(-1, self.embed_dim)


class VisionMLP(nn.Module):
    """Qwen2-VL's plain MLP: fc2(act(fc1(x)))."""

    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Bidirectional attention inside each segment of a packed (seq, heads, dim) batch.

    Segments of equal length (the windows of one image, frames of equal size) run as one batched call,
    so a batch of many images costs a handful of kernel launches rather than one per segment.
    """
    out = torch.empty_like(q)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if n:
            by_length.setdefault(n, []).append(starts[i])
    for n, seg_starts in by_length.items():
        idx = (torch.tensor(seg_starts, device=q.device)[:, None] + torch.arange(n, device=q.device)).reshape(
            -1
        )
        shape = (len(seg_starts), n, q.shape[1], q.shape[2])
        qs, ks, vs = (t.index_select(0, idx).view(shape).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs)
        out.index_copy_(0, idx, o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2]))
    return out


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        seq = x.shape[0]
        q, k, v = self.qkv(x).reshape(seq, 3, self.num_heads, -1).unbind(1)
        # Rotary in float32 whatever the weights' dtype, as the reference does.
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        return self.proj(segment_attention(q, k, v, lengths).reshape(seq, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.family == "qwen2_vl":
            self.norm1: nn.Module = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
            self.norm2: nn.Module = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
            self.mlp: nn.Module = VisionMLP(cfg.embed_dim, cfg.mlp_dim, cfg.hidden_act)
        else:
            self.norm1 = RMSNorm(cfg.embed_dim, eps=1e-6)
            self.norm2 = RMSNorm(cfg.embed_dim, eps=1e-6)
            self.mlp = GatedMLP(cfg.embed_dim, cfg.mlp_dim, cfg.hidden_act, bias=True)
        self.attn = VisionAttention(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each merge×merge group of patches and projects it to the decoder's width."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.group_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q: nn.Module = (
            nn.LayerNorm(cfg.embed_dim, eps=1e-6)
            if cfg.family == "qwen2_vl"
            else RMSNorm(cfg.embed_dim, eps=1e-6)
        )
        self.mlp = nn.Sequential(
            nn.Linear(self.group_dim, self.group_dim), nn.GELU(), nn.Linear(self.group_dim, cfg.out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.group_dim))


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(h, w) of every patch, in the merge-block order the image processor emits patches in."""
    out = []
    for t, h, w in grids:
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(1, 2).flatten()
        wpos = wpos.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_index(grids: list[tuple[int, int, int]], cfg: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's window partition: a permutation of merged tokens grouping each window, and the
    window lengths in patches."""
    merge = cfg.spatial_merge_size
    win = cfg.window_size // merge // cfg.patch_size
    order: list[torch.Tensor] = []
    lengths: list[int] = []
    offset = 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = win - gh % win, win - gw % win
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        padded = F.pad(index, (0, pad_w, 0, pad_h), value=-100)
        padded = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        counts = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        order.append(flat[flat != -100] + offset)
        lengths.extend(int(c) * merge * merge for c in counts if c > 0)
        offset += t * gh * gw
    return torch.cat(order), lengths


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        # Not a buffer: models are built on the meta device and get their weights assigned.
        self.inv_freq: torch.Tensor | None = None

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq is None:
            spatial = self.cfg.head_dim // 2
            steps = torch.arange(0, spatial, 2, dtype=torch.float, device=positions.device)
            self.inv_freq = 1.0 / (self.cfg.rope_theta ** (steps / spatial))
        freqs = positions[..., None].float() * self.inv_freq  # (N, 2, head_dim/4)
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # broadcast over heads
        return emb.cos(), emb.sin()

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Packed patches of several images → packed merged embeddings, in the same image order."""
        cfg = self.cfg
        device = pixels.device
        x = self.patch_embed(pixels)
        positions = patch_positions(grids, cfg.spatial_merge_size).to(device)
        frame_lengths = [h * w for t, h, w in grids for _ in range(t)]
        windowed = cfg.family == "qwen2_5_vl"
        if windowed:
            order, window_lengths = window_index(grids, cfg)
            order = order.to(device)
            unit = cfg.spatial_merge_size**2
            x = x.view(-1, unit, x.shape[-1])[order].view(x.shape)
            positions = positions.view(-1, unit, 2)[order].view(positions.shape)
        cos, sin = self._rotary(positions)
        for i, block in enumerate(self.blocks):
            full = not windowed or i in cfg.fullatt_block_indexes
            x = block(x, cos, sin, frame_lengths if full else window_lengths)
        merged = self.merger(x)
        if windowed:
            merged = merged[torch.argsort(order)]
        return merged
