"""The model's stages on one device: encode(images), and forward_step(sequences, token counts), which
runs prefill chunks and decode tokens mixed in one forward (`prefill` and `decode_step` are its two
pure cases).

The runner owns the weights and the KV pool and does tensor work only; which requests run, and when,
is the scheduler's business. Positions come from each sequence's own tokens and grids.
"""

from __future__ import annotations

import torch

from serving.config import EngineConfig
from serving.engine import compaction
from serving.engine.allocator import tune_allocator
from serving.engine.backends import backend_for, checked
from serving.engine.image_processor import ImageProcessorConfig, ProcessedImage
from serving.engine.kv_cache import KVPool
from serving.engine.kv_sizing import DeviceMemory, budget_blocks, check_fits, pool_blocks
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
        tune_allocator()
        self.cfg = cfg
        self.model_config = model_config or load_model_config(cfg.model)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = load_model(cfg.model, self.dtype, self.device, self.model_config)
        # How attention runs here (C kernels on a CPU, Triton on CUDA, batched torch anywhere): each
        # step is planned by it once and every layer runs through it (serving/engine/backends).
        text = self.model_config.text
        self.attention, _ = checked(  # a fallback's reason is logged there
            backend_for(self.device),
            text.num_heads,
            text.num_kv_heads,
            text.head_dim,
            cfg.block_size,
            self.dtype,
            self.device,
        )
        self.attention.prepare(self.model)
        # Sized from the device's memory: a pool for one profiling step first, then the measured size.
        self.profiled_blocks: int | None = None
        profiling = cfg.gpu_memory_utilization is not None
        if profiling and self.device.type != "cuda":
            raise ValueError(
                "gpu_memory_utilization sizes the KV pool from a CUDA device's memory; on "
                f"{self.device.type} give the pool's size (--kv-cache-memory)"
            )
        step_blocks = -(-min(cfg.max_step_tokens, cfg.max_model_len) // cfg.block_size)
        self.pool = KVPool(
            num_layers=text.num_layers,
            num_kv_heads=text.num_kv_heads,
            head_dim=text.head_dim,
            block_size=cfg.block_size,
            num_blocks=step_blocks if profiling else pool_blocks(cfg, self.model_config, self.dtype_bytes),
            dtype=self.dtype,
            device=self.device,
        )
        if profiling:
            memory = self.profile_memory()
            per_block = self.model_config.kv_bytes_per_token(self.dtype_bytes) * cfg.block_size
            blocks = budget_blocks(memory, cfg.gpu_memory_utilization, per_block)
            source = f"--gpu-memory-utilization (now {cfg.gpu_memory_utilization})"
            self.profiled_blocks = check_fits(cfg, self.model_config, self.dtype_bytes, blocks, source)
            self.resize_pool(self.profiled_blocks)

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
    def dtype_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    @property
    def full_pool_blocks(self) -> int:
        """The pool size the engine config asks for (or the device's memory buys): a decode worker's."""
        if self.profiled_blocks is not None:
            return self.profiled_blocks
        return pool_blocks(self.cfg, self.model_config, self.dtype_bytes)

    @torch.inference_mode()
    def profile_forward(self) -> None:
        """The largest step this worker runs, on dummy inputs: `max_step_tokens` tokens of one
        sequence through the decoder and the LM head for `max_num_seqs` rows, then the vision tower on
        an image at the pixel budget. Its KV lands in the pool's first blocks (nothing is cached)."""
        cfg, text = self.cfg, self.model_config.text
        n = min(cfg.max_step_tokens, cfg.max_model_len)
        embeds = torch.zeros(n, text.hidden_size, dtype=self.dtype, device=self.device)
        positions = torch.arange(n, device=self.device).expand(3, n)
        table = list(range(-(-n // cfg.block_size)))
        batch = self.attention.plan([n], [n], [table], cfg.block_size, self.device)
        hidden = self.model(embeds, positions, self.pool, batch)
        self.model.logits(hidden[-min(n, cfg.max_num_seqs) :])
        images = ImageProcessorConfig.from_dir(cfg.model)
        side = int(images.max_pixels**0.5) // (images.patch_size * images.merge_size) * images.merge_size
        width = 3 * images.temporal_patch_size * images.patch_size**2
        pixels = torch.zeros(side * side, width, dtype=torch.float32, device=self.device)
        self.model.encode(pixels, [(1, side, side)])

    def profile_memory(self) -> DeviceMemory:
        """The device's memory around one `profile_forward` (CUDA only)."""
        device = self.device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        weights = torch.cuda.memory_allocated(device)
        self.profile_forward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - weights
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        return DeviceMemory(total, free, torch.cuda.memory_reserved(device), weights, peak)

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

    # -- P and D ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """One forward over every sequence's uncached prompt tokens; KV lands in each sequence's blocks.
        Returns the last position's logits per sequence (B, V)."""
        return self.forward_step(seqs, [s.num_prefill_tokens - s.num_cached for s in seqs])

    @torch.inference_mode()
    def decode_step(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's newest token; the batch runs as one forward. Returns logits (B, V)."""
        return self.forward_step(seqs, [1] * len(seqs))

    @torch.inference_mode()
    def forward_step(self, seqs: list[Sequence], q_lens: list[int]) -> torch.Tensor:
        """One forward over each sequence's next `q_len` uncached tokens — a decode token, a prefill
        chunk or a whole prompt, mixed in one batch. KV lands in each sequence's blocks; returns the
        logits of each sequence's last computed position (B, V)."""
        if all(q == 1 and s.num_cached >= len(s.prompt_token_ids) for s, q in zip(seqs, q_lens, strict=True)):
            return self._decode_forward(seqs)
        cfg = self.model_config
        token_ids: list[int] = []
        positions: list[torch.Tensor] = []
        image_mask: list[torch.Tensor] = []
        image_rows: list[torch.Tensor] = []
        for seq, q_len in zip(seqs, q_lens, strict=True):
            start, end = seq.num_cached, seq.num_cached + q_len
            tokens = seq.token_slice(start, end)
            token_ids.extend(tokens)
            positions.append(self._positions(seq, start, end))
            prompt_len = len(seq.prompt_token_ids)
            if start < prompt_len and seq.image_embeds is not None:
                # Outputs replayed after a migration are text whatever their ids: only prompt pads take
                # visual embeddings, the rows of this chunk's pads in prompt order.
                pads = cfg.media_pad_ids
                is_pad = torch.isin(torch.tensor(tokens), torch.tensor(pads))
                is_pad[prompt_len - start :] = False
                before = sum(seq.prompt_token_ids[:start].count(p) for p in pads)
                image_rows.append(seq.image_embeds[before : before + int(is_pad.sum())])
            else:
                is_pad = torch.zeros(len(tokens), dtype=torch.bool)
            image_mask.append(is_pad)
            self.pool.grow(seq.block_table, end)
        ids = torch.tensor(token_ids, device=self.device)
        rows = torch.cat(image_rows).to(self.device) if image_rows else None
        mask = torch.cat(image_mask).to(self.device) if rows is not None else None
        embeds = self.model.embed(ids, rows, mask)
        logits = self._forward(seqs, embeds, torch.cat(positions, dim=1), q_lens, observe=True)
        for seq, q_len in zip(seqs, q_lens, strict=True):
            seq.num_cached += q_len
        return logits

    def _decode_forward(self, seqs: list[Sequence]) -> torch.Tensor:
        """The common step, every sequence past its prompt feeding its newest token: no slicing."""
        for seq in seqs:
            self.pool.grow(seq.block_table, seq.num_cached + 1)
        ids = torch.tensor([s.last_token for s in seqs], device=self.device)
        pos = torch.tensor([s.num_cached + s.rope_delta for s in seqs], device=self.device)
        logits = self._forward(seqs, self.model.embed(ids, None), pos.expand(3, -1), [1] * len(seqs))
        for seq in seqs:
            seq.num_cached += 1
        return logits

    def _positions(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """M-RoPE positions (3, end - start) of tokens [start, end): the prompt's from its tokens and
        grids (made once per request), every later token at index + rope delta on all three axes."""
        prompt_len = len(seq.prompt_token_ids)
        if start < prompt_len and seq.prompt_positions is None:
            cfg = self.model_config
            seq.prompt_positions, seq.rope_delta = mrope_positions(
                seq.prompt_token_ids,
                seq.grids,
                cfg.image_token_id,
                cfg.vision.spatial_merge_size,
                cfg.video_token_id,
                seq.video_seconds,
                cfg.vision.tokens_per_second if cfg.family == "qwen2_5_vl" else None,
                seq.keep,
                seq.kept,
            )
        if start >= prompt_len:
            return (torch.arange(start, end) + seq.rope_delta).expand(3, -1)
        assert seq.prompt_positions is not None
        head = seq.prompt_positions[:, start : min(end, prompt_len)]
        if end <= prompt_len:
            return head
        tail = (torch.arange(prompt_len, end) + seq.rope_delta).expand(3, -1)
        return torch.cat([head, tail], dim=1)

    # -- shared -----------------------------------------------------------------------------------

    def _observers(self, seqs: list[Sequence], q_lens: list[int]) -> list[compaction.Observer]:
        """The sequences of this step whose chunk holds some of their compaction window's queries."""
        out, row = [], 0
        for seq, q_len in zip(seqs, q_lens, strict=True):
            start = seq.num_cached
            if seq.kv_scores is not None:
                lo, hi = compaction.window(len(seq.prompt_token_ids))
                first, last = max(lo, start), min(hi, start + q_len)
                if first < last:
                    positions = torch.arange(first, last, device=self.device)
                    out.append(
                        compaction.Observer(
                            rows=positions - start + row,
                            positions=positions,
                            ctx=min(start + q_len, hi),
                            table=torch.tensor(seq.block_table, dtype=torch.long, device=self.device),
                            scores=seq.kv_scores,
                        )
                    )
            row += q_len
        return out

    def _forward(
        self,
        seqs: list[Sequence],
        embeds: torch.Tensor,
        positions: torch.Tensor,
        q_lens: list[int],
        observe: bool = False,
    ) -> torch.Tensor:
        ctx_lens = [s.num_cached + q for s, q in zip(seqs, q_lens, strict=True)]
        batch = self.attention.plan(
            q_lens, ctx_lens, [s.block_table for s in seqs], self.pool.block_size, self.device
        )
        if observe:  # steps with prompt tokens only: a decode-only step holds no compaction window
            batch.observers = self._observers(seqs, q_lens)
        hidden = self.model(embeds, positions.to(self.device), self.pool, batch)
        last = torch.tensor(q_lens, device=self.device).cumsum(0) - 1
        return self.model.logits(hidden.index_select(0, last))
