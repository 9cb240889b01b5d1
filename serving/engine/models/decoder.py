"""Qwen2 decoder with multimodal rotary embeddings (M-RoPE), running over the paged KV pool."""

from __future__ import annotations

import torch
from torch import nn

from serving.engine import compaction
from serving.engine.attention import AttentionBatch, paged_attention
from serving.engine.backends.pointwise import TORCH, Pointwise
from serving.engine.kv_cache import KVPool
from serving.engine.models.config import TextConfig
from serving.engine.models.decode_layers import DecodeLayers
from serving.engine.models.layers import GatedMLP, RMSNorm, concat_linear


class MRotary:
    """cos/sin for M-RoPE: the rotary frequencies are split into (t, h, w) sections, each section
    turned by its own coordinate of the token's 3-D position."""

    def __init__(self, cfg: TextConfig, device: torch.device) -> None:
        dim = cfg.head_dim
        self.inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim)
        )
        self.section = list(cfg.mrope_section)

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, T) → cos, sin of shape (T, 1, head_dim)."""
        freqs = positions[..., None].float() * self.inv_freq  # (3, T, head_dim/2)
        freqs = torch.cat([part[i % 3] for i, part in enumerate(freqs.split(self.section, dim=-1))], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    pointwise: Pointwise = TORCH  # the backend's `prepare` may bind its own

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.qkv: nn.Linear | None = None

    def fuse(self) -> None:
        """Q, K and V as one matmul (after the weights load)."""
        self.qkv = concat_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: torch.Tensor,
        batch: AttentionBatch,
    ) -> torch.Tensor:
        tokens, heads, kv_heads, dim = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        turn = self.pointwise.rotary
        if self.qkv is not None:
            qkv = self.qkv(x)
            # Q's and K's heads lie side by side at the start of each fused row: one pass turns both
            # (in place where the backend has a kernel for it).
            qk = turn(qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim), cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
            q, k, v = turn(q, cos, sin), turn(k, cos, sin), v.view(tokens, kv_heads, dim)
        out = paged_attention(q, k, v, kv, batch)
        if batch.observers:  # visual-KV compaction scores this layer's attention from the window
            compaction.observe(q, kv, batch.observers)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "silu", bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, h, cos, sin, kv, batch):  # noqa: ANN001 - hot path, types as in Decoder.forward
        """x: the residual stream; h: the previous layer's MLP output, not yet added to it (None in
        the first layer). Returns the stream and this layer's MLP output, added by the next norm."""
        x, y = self.input_layernorm.add_norm(x, h)
        x, y = self.post_attention_layernorm.add_norm(x, self.self_attn(y, cos, sin, kv, batch))
        return x, self.mlp(y)


def fuse_projections(model: nn.Module) -> None:
    """Fuse every attention's Q/K/V and every gated MLP's gate/up in `model`, and turn the patch
    embedding's convolution into a matmul (after loading)."""
    from serving.engine.models.vision import PatchEmbed

    for module in list(model.modules()):
        if isinstance(module, (Attention, GatedMLP, PatchEmbed)):
            module.fuse()


class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary: MRotary | None = None
        # Decode-only steps as one C call (bound after loading, where the kernels run): see decode_layers.
        self.decode_layers: DecodeLayers | None = None

    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, pool: KVPool, batch: AttentionBatch
    ) -> torch.Tensor:
        """Packed embeddings (T, D) and their M-RoPE positions (3, T) → final hidden states (T, D)."""
        if self.rotary is None:
            self.rotary = MRotary(self.cfg, embeds.device)
        cos, sin = self.rotary(positions, embeds.dtype)
        if self.decode_layers is not None:
            hidden = self.decode_layers(embeds, cos, sin, pool, batch)
            if hidden is not None:
                return hidden
        x, h = embeds, None
        for i, layer in enumerate(self.layers):
            x, h = layer(x, h, cos, sin, pool.layer(i), batch)
        return self.norm.add_norm(x, h)[1]
