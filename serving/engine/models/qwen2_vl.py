"""Qwen2-VL / Qwen2.5-VL: vision tower + merger feeding a Qwen2 decoder. Module names follow the
Hugging Face checkpoint layout (`visual.*`, `model.*`, `lm_head`) so weights load without renaming."""

from __future__ import annotations

import torch
from torch import nn

from serving.engine.attention import AttentionBatch
from serving.engine.kv_cache import KVPool
from serving.engine.models.config import ModelConfig
from serving.engine.models.decoder import Decoder
from serving.engine.models.vision import VisionTower


class Qwen2VL(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.model = Decoder(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def tie_weights(self) -> None:
        if self.cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Packed patches of several images → their packed visual embeddings (N_v, D_L)."""
        return self.visual(pixels.to(self.visual.patch_embed.dtype), grids)

    def embed(
        self,
        token_ids: torch.Tensor,
        image_embeds: torch.Tensor | None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each image-pad position (or each position of `image_mask`) replaced,
        in order, by a visual embedding."""
        embeds = self.model.embed_tokens(token_ids)
        if image_embeds is not None and image_embeds.numel():
            pads = torch.tensor(self.cfg.media_pad_ids, device=token_ids.device)
            mask = torch.isin(token_ids, pads) if image_mask is None else image_mask
            embeds[mask] = image_embeds.to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def forward(
        self, embeds: torch.Tensor, positions: torch.Tensor, pool: KVPool, batch: AttentionBatch
    ) -> torch.Tensor:
        return self.model(embeds, positions, pool, batch)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
