"""The model's three stages on one device: encode(images), prefill(sequences), decode_step(sequences).

The runner owns the weights and the KV pool and does tensor work only; which requests run, and when,
is the scheduler's business. Positions come from each sequence's own tokens and grids.
"""

from __future__ import annotations

import torch

from serving.config import EngineConfig
from serving.engine.attention import AttentionBatch
from serving.engine.image_processor import ProcessedImage
from serving.engine.kv_cache import KVPool
from serving.engine.models.config import ModelConfig, load_model_config
from serving.engine.models.loader import load_model
from serving.engine.mrope import mrope_positions
from serving.engine.sequence import Sequence

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_config: ModelConfig | None = None) -> None:
        self.cfg = cfg
        self.model_config = model_config or load_model_config(cfg.model)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = load_model(cfg.model, self.dtype, self.device, self.model_config)
        text = self.model_config.text
        self.pool = KVPool(
            num_layers=text.num_layers,
            num_kv_heads=text.num_kv_heads,
            head_dim=text.head_dim,
            block_size=cfg.block_size,
            num_blocks=cfg.num_kv_blocks or self._blocks_for_memory(cfg.kv_cache_memory_gb),
            dtype=self.dtype,
            device=self.device,
        )

    def resize_pool(self, num_blocks: int) -> None:
        """Replace the KV pool with one of `num_blocks` blocks (the old one must hold nothing)."""
        old = self.pool
        if num_blocks == old.num_blocks:
            return
        self.pool = KVPool(
            num_layers=old.data.shape[1],
            num_kv_heads=old.data.shape[4],
            head_dim=old.data.shape[5],
            block_size=old.block_size,
            num_blocks=num_blocks,
            dtype=old.data.dtype,
            device=old.data.device,
        )

    @property
    def full_pool_blocks(self) -> int:
        """The pool size the engine config asks for: what a decode worker gets."""
        return self.cfg.num_kv_blocks or self._blocks_for_memory(self.cfg.kv_cache_memory_gb)

    def _blocks_for_memory(self, gigabytes: float) -> int:
        per_token = self.model_config.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8)
        return max(1, int(gigabytes * 2**30) // (per_token * self.cfg.block_size))

    # -- E ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        """Images of any sizes, batched into one vision-tower pass → one embedding tensor per image."""
        if not images:
            return []
        pixels = torch.cat([im.pixel_values for im in images]).to(self.device)
        grids = [im.grid_thw for im in images]
        embeds = self.model.encode(pixels, grids)
        return list(embeds.split([self.model_config.num_image_tokens(g) for g in grids]))

    # -- P ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """One forward over every sequence's uncached prompt tokens; KV lands in each sequence's blocks.
        Returns the last position's logits per sequence (B, V)."""
        token_ids, positions, q_lens = [], [], []
        cfg = self.model_config
        image_mask = []
        for seq in seqs:
            tokens = self._prefill_tokens(seq)
            pos, seq.rope_delta = mrope_positions(
                seq.prompt_token_ids, seq.grids, cfg.image_token_id, cfg.vision.spatial_merge_size
            )
            # Outputs replayed after a migration are text whatever their ids: they sit where decode put
            # them (index + rope delta) and are never replaced by visual embeddings.
            outputs = torch.arange(len(seq.prompt_token_ids), len(tokens)) + seq.rope_delta
            pos = torch.cat([pos, outputs.expand(3, -1)], dim=1)
            new = slice(seq.num_cached, len(tokens))
            token_ids.extend(tokens[new])
            positions.append(pos[:, new])
            is_pad = torch.tensor(tokens[new]) == cfg.image_token_id
            is_pad[max(0, len(seq.prompt_token_ids) - seq.num_cached) :] = False
            image_mask.append(is_pad)
            q_lens.append(len(tokens) - seq.num_cached)
            self.pool.grow(seq.block_table, len(tokens))
        ids = torch.tensor(token_ids, device=self.device)
        mask = torch.cat(image_mask).to(self.device)
        embeds = self.model.embed(ids, self._packed_image_embeds(seqs), mask)
        logits = self._forward(seqs, embeds, torch.cat(positions, dim=1), q_lens)
        for seq, q_len in zip(seqs, q_lens, strict=True):
            seq.num_cached += q_len
        return logits

    @staticmethod
    def _prefill_tokens(seq: Sequence) -> list[int]:
        """The tokens whose KV a prefill computes: the prompt, plus restored outputs but the newest
        (a migrated request's next decode step feeds that one)."""
        tokens = seq.prompt_token_ids + seq.output_token_ids
        return tokens[:-1] if seq.resume_pending else tokens

    def _packed_image_embeds(self, seqs: list[Sequence]) -> torch.Tensor | None:
        parts = [s.image_embeds for s in seqs if s.image_embeds is not None and s.num_cached == 0]
        return torch.cat(parts).to(self.device) if parts else None

    # -- D ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode_step(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's newest token; the batch runs as one forward. Returns logits (B, V)."""
        for seq in seqs:
            self.pool.grow(seq.block_table, seq.num_cached + 1)
        ids = torch.tensor([s.last_token for s in seqs], device=self.device)
        pos = torch.tensor([s.num_cached + s.rope_delta for s in seqs], device=self.device)
        embeds = self.model.embed(ids, None)
        logits = self._forward(seqs, embeds, pos.expand(3, -1), [1] * len(seqs))
        for seq in seqs:
            seq.num_cached += 1
        return logits

    # -- shared -----------------------------------------------------------------------------------

    def _forward(
        self, seqs: list[Sequence], embeds: torch.Tensor, positions: torch.Tensor, q_lens: list[int]
    ) -> torch.Tensor:
        ctx_lens = [s.num_cached + q for s, q in zip(seqs, q_lens, strict=True)]
        batch = AttentionBatch.build(
            q_lens, ctx_lens, [s.block_table for s in seqs], self.pool.block_size, self.device
        )
        hidden = self.model(embeds, positions.to(self.device), self.pool, batch)
        last = torch.tensor(q_lens, device=self.device).cumsum(0) - 1
        return self.model.logits(hidden.index_select(0, last))
