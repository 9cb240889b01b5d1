"""The engine in one process: encode → prefill → decode with continuous batching.

Lifecycle of a request inside the engine:
  1. add_request: the prompt (tokens with expanded image pads, preprocessed images) becomes a Sequence
     in the waiting queue; a request that could never fit the KV pool is refused here.
  2. step: one forward over the step's token budget — every running request's newest token first,
     then prefill chunks of admitted requests (images encoded in one vision-tower batch when a
     request's first chunk is scheduled). A request whose prompt is now fully cached samples its first
     token; one whose chunk left prompt tokens uncached continues next step.
  3. Every later step: each running request feeds its newest token, in the same forward as others'
     prefill chunks.
  4. After each step: tokens are appended, detokenized and checked against the stop rules; finished
     requests leave the batch and give their KV blocks back.

Prefix caching (cfg.enable_prefix_caching): add_request hashes the prompt's full blocks (images by
content); admission starts a request after its longest cached prefix; after every step the blocks a
prefill completed are registered for later requests. Blocks imported from a prefill worker
(`reserve`, `add_prefilled`) are private: decode workers do not cache them.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from serving.config import EngineConfig
from serving.engine import compaction, pruning, structured
from serving.engine.image_processor import ImageProcessor, ImageProcessorConfig
from serving.engine.inputs import InputProcessor, Prompt
from serving.engine.kv_cache import KVExport, content_key, prompt_block_hashes
from serving.engine.models.config import load_model_config
from serving.engine.runner import ModelRunner
from serving.engine.sampler import sample
from serving.engine.scheduler import Batch, Scheduler
from serving.engine.sequence import Sequence
from serving.engine.tokenizer import Tokenizer
from serving.engine.video_processor import VideoProcessor, video_config
from serving.types import FinishReason, Rejected, RequestStatus, SamplingParams, StageTimings, TokenDelta

log = logging.getLogger(__name__)


@dataclass
class Prefilled:
    """What a prefill hands to decode: the first token, the rope delta and the KV it produced."""

    request_id: str
    first_token: int
    rope_delta: int
    kv: KVExport


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason


class LLMEngine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.model_config = load_model_config(cfg.model)
        self.tokenizer = Tokenizer(cfg.model)
        self.inputs = InputProcessor(
            self.model_config,
            self.tokenizer,
            ImageProcessor(ImageProcessorConfig.from_dir(cfg.model)),
            VideoProcessor(video_config(cfg.model)),
        )
        self.runner = ModelRunner(cfg, self.model_config)
        self.scheduler = Scheduler(cfg, self.runner.pool)
        self._seqs: dict[str, Sequence] = {}
        self._prefill_only: set[str] = set()
        self.held: dict[str, Sequence] = {}  # prefilled, KV kept for a decode worker to take
        self._reserved: dict[str, Sequence] = {}  # blocks set aside for KV arriving from a prefill
        self._ids = itertools.count()
        self.last_batch: Batch | None = None  # what the latest step ran: its sequences and token counts
        # Requests whose prefill completed in the latest step -> their prefill time (from the start of the
        # step that took their first prompt chunk to the end of this one: vLLM's prefill time) and their
        # wait before it (from being queued here to that step's start).
        self.last_prefilled: dict[str, StageTimings] = {}
        self.requests_failed = 0  # requests that failed alone inside a step
        self.visual_kv_kept = 0  # compacted handoffs: visual tokens' KV rows handed on …
        self.visual_kv_dropped = 0  # … and left behind
        self.prefill_tokens_computed = 0  # prompt (and resumed) tokens run through the model
        # Called with (stage, request ids) before each batch runs; tests inject faults through it.
        self.fault_hook: Callable[[str, list[str]], None] | None = None
        self._ll_tokenizer: Any = None

    # -- requests ---------------------------------------------------------------------------------

    def make_sequence(
        self, request_id: str, prompt: Prompt, params: SamplingParams, prefill_only: bool = False
    ) -> Sequence:
        if len(prompt.token_ids) >= self.cfg.max_model_len:
            raise ValueError(
                f"prompt is {len(prompt.token_ids)} tokens; the limit is {self.cfg.max_model_len - 1}"
            )
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(prompt.token_ids),
            params=params,
            detokenizer=self.tokenizer.detokenizer(),
            eos_token_ids=self.model_config.eos_token_ids,
            max_model_len=self.cfg.max_model_len,
            images=list(prompt.images),
            grids=list(prompt.grids),
            video_seconds=list(prompt.video_seconds),
            keep=list(prompt.keep),
            kept=prompt.kept,
            num_image_tokens=sum(self.model_config.media_tokens(prompt.grids, prompt.keep)),
            prefill_only=prefill_only,
        )
        if params.grammar is not None:
            seq.matcher = structured.new_matcher(self._grammar_tokenizer(), params.grammar)
        if self.runner.pool.blocks_for(seq.max_len) > self.runner.pool.num_blocks:
            raise ValueError("request needs more KV cache than this worker has")
        return seq

    def _grammar_tokenizer(self) -> Any:
        """llguidance's tokenizer, built on the first request with a grammar (tens of milliseconds)."""
        if self._ll_tokenizer is None:
            cfg = self.model_config
            self._ll_tokenizer = structured.load_tokenizer(
                self.cfg.model, cfg.text.vocab_size, cfg.eos_token_ids
            )
        return self._ll_tokenizer

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        prefill_only: bool = False,
        image_embeds: torch.Tensor | None = None,
        resume: list[int] | None = None,
    ) -> str:
        """Queue a request. `image_embeds` (the prompt's images, encoded elsewhere) skips encode.
        With prefill_only it stops after its first token and its KV is held (see `held`, `export_kv`,
        `release`) for a decode worker to take. `resume` are outputs another worker already produced
        and streamed (a migrated request): the prefill recomputes their KV instead of sampling, and the
        request goes on from the newest of them."""
        request_id = request_id or f"req-{next(self._ids)}"
        if self.holds(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = self.make_sequence(request_id, prompt, params, prefill_only=prefill_only)
        if resume:
            seq.restore(resume)
            seq.resume_pending = True
            if self.runner.pool.blocks_for(seq.max_len) > self.runner.pool.num_blocks:
                raise ValueError("request needs more KV cache than this worker has")
        if image_embeds is not None:
            if image_embeds.shape[0] != seq.num_image_tokens:
                raise ValueError("image embeddings do not match the prompt's image tokens")
            seq.image_embeds = image_embeds
        elif prompt.grids and not prompt.images:
            raise ValueError("the prompt has image grids but neither pixels nor embeddings")
        pads = self.model_config.media_pad_ids
        if prefill_only and params.visual_kv_budget < 1 and any(t in pads for t in seq.prompt_token_ids):
            # Visual-KV compaction at the handoff: the prompt's window queries score every position.
            seq.kv_scores = torch.zeros(len(seq.prompt_token_ids), device=self.runner.device)
        if self.cfg.enable_prefix_caching:
            seq.block_hashes = prompt_block_hashes(
                seq.prompt_token_ids,
                self.runner.pool.block_size,
                self.model_config.media_pad_ids,
                self._image_keys(seq),
            )
        self._seqs[request_id] = seq
        if prefill_only:
            self._prefill_only.add(request_id)
        self.scheduler.add(seq)
        return request_id

    def _image_keys(self, seq: Sequence) -> list[tuple[bytes, int]] | None:
        """(content key, pad rows) of each image, for the prefix cache: from the pixels when the request
        brings them, else from its embeddings (so a request's images match others sent the same way)."""
        counts = self.model_config.media_tokens(seq.grids, seq.keep)
        if seq.images:
            # The kept count too: pruning's choice is a function of the pixels and the count (the
            # method is the engine's), and two counts put other rows under the same pads.
            return [
                (content_key(im.pixel_values, 0, *im.grid_thw, n), n)
                for im, n in zip(seq.images, counts, strict=True)
            ]
        if seq.image_embeds is not None:
            rows = seq.image_embeds.split(counts)
            return [(content_key(r, 1, *g), n) for r, g, n in zip(rows, seq.grids, counts, strict=True)]
        return None if counts else []

    def reserve(
        self, request_id: str, prompt: Prompt, params: SamplingParams, kv_tokens: int
    ) -> list[int] | None:
        """Set aside KV blocks for a request prefilled elsewhere, for a transport to fill. Returns the
        block table, or None when the pool has no room for the request yet."""
        if self.holds(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        bare = Prompt(
            prompt.token_ids,
            grids=list(prompt.grids),
            video_seconds=list(prompt.video_seconds),
            keep=list(prompt.keep),
        )
        seq = self.make_sequence(request_id, bare, params)
        if not self.scheduler.can_admit(seq):
            return None
        self.runner.pool.grow(seq.block_table, kv_tokens)
        self._reserved[request_id] = seq
        self.scheduler.reserved[request_id] = seq
        return seq.block_table

    def join_reserved(
        self,
        request_id: str,
        first_token: int,
        rope_delta: int,
        kv_tokens: int,
        restored: list[int] | None = None,
    ) -> None:
        """The reserved blocks now hold the request's KV: it joins the decode batch. `restored` are
        every output streamed so far (a migrated request; the last one is `first_token`)."""
        if restored and restored[-1] != first_token:
            raise ValueError("the restored outputs must end with the handed-over token")
        seq = self._reserved.pop(request_id)
        self.scheduler.reserved.pop(request_id, None)
        seq.num_cached = kv_tokens
        seq.rope_delta = rope_delta
        # The tokens were already streamed elsewhere; replaying them primes the stop rules and text.
        seq.restore(restored or [first_token])
        self._seqs[request_id] = seq
        if seq.num_cached < seq.num_tokens - 1:
            # A compacted handoff carries the prompt's kept rows only: the streamed outputs' KV is
            # recomputed here, over those rows, as a prefill that samples nothing.
            seq.resume_pending = True
            self.scheduler.add(seq)
            return
        self.scheduler.add_running(seq)

    def add_prefilled(self, prompt: Prompt, params: SamplingParams, prefilled: Prefilled) -> bool:
        """Continue a request another engine prefilled, from its exported KV. False when no room yet."""
        table = self.reserve(prefilled.request_id, prompt, params, prefilled.kv.num_tokens)
        if table is None:
            return False
        self.runner.pool.import_into(table, prefilled.kv)
        self.join_reserved(
            prefilled.request_id, prefilled.first_token, prefilled.rope_delta, prefilled.kv.num_tokens
        )
        return True

    def held_kv(self, request_id: str) -> tuple[list[int], int, int, int]:
        """(block table, cached tokens, first token, rope delta) of a held request."""
        seq = self.held[request_id]
        return seq.block_table, seq.num_cached, seq.last_token, seq.rope_delta

    def compact_held(self, request_id: str) -> tuple[list[int], list[int]] | None:
        """Visual-KV compaction of a held request: the kept positions of its prompt and new blocks
        holding only their KV, packed (the request's own blocks stay whole); None when it asked for
        none, or no block is free for the copy now (then it goes whole). Outputs a resumed prefill
        recomputed are left out: their KV saw the evicted tokens, and the decode worker recomputes
        them over the kept ones, as they were decoded first."""
        seq = self.held[request_id]
        if seq.kv_scores is None:
            return None
        pool = self.runner.pool
        prompt = len(seq.prompt_token_ids)
        kept = compaction.select(
            seq.kv_scores.cpu(), seq.prompt_token_ids, self.model_config.media_pad_ids,
            seq.params.visual_kv_budget, prompt, self.cfg.kv_compaction_method,
        )  # fmt: skip
        need = pool.blocks_for(len(kept))
        if len(kept) == prompt or pool.num_free < need:
            return None
        blocks = pool.allocate(need)
        visual = sum(t in self.model_config.media_pad_ids for t in seq.prompt_token_ids)
        self.visual_kv_dropped += prompt - len(kept)
        self.visual_kv_kept += visual - (prompt - len(kept))
        compaction.gather(pool.data, seq.block_table, kept, blocks)
        return kept, blocks

    def free_blocks(self, blocks: list[int]) -> None:
        """Give back blocks `compact_held` took."""
        self.runner.pool.free(blocks)

    def export_kv(self, request_id: str) -> Prefilled:
        seq = self.held[request_id]
        kv = self.runner.pool.export_blocks(seq.block_table, seq.num_cached)
        return Prefilled(request_id, seq.output_token_ids[0], seq.rope_delta, kv)

    def release(self, request_id: str) -> None:
        """Give back the KV blocks of a held request (taken, cancelled or expired)."""
        if seq := self.held.pop(request_id, None):
            self.runner.pool.free(seq.block_table)

    def abort(self, request_id: str) -> None:
        self._prefill_only.discard(request_id)
        self.release(request_id)
        if seq := self._reserved.pop(request_id, None):
            self.scheduler.reserved.pop(request_id, None)
            self.runner.pool.free(seq.block_table)
        if seq := self._seqs.pop(request_id, None):
            seq.finish(FinishReason.ABORT)
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def holds(self, request_id: str) -> bool:
        """Whether the engine keeps anything for the request: queued, running, held or reserved."""
        return request_id in self._seqs or request_id in self.held or request_id in self._reserved

    def request_ids(self) -> set[str]:
        return set(self._seqs) | set(self.held) | set(self._reserved)

    def resize_kv(self, num_blocks: int) -> None:
        """A new KV pool of `num_blocks` (a worker whose roles changed); only while nothing uses it.
        The prefix cache is dropped first: it names blocks of the old pool."""
        if self.request_ids():
            raise RuntimeError("the KV pool can only be resized while the engine holds no request")
        pool = self.runner.pool
        pool.reset_prefix_cache()
        if pool.num_free != pool.num_blocks:  # a leak: harmless here (the pool is replaced), but a bug
            log.warning("%d KV blocks still held with no request", pool.num_blocks - pool.num_free)
        self.runner.resize_pool(num_blocks)
        self.scheduler.pool = self.runner.pool

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[TokenDelta]:
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        self.last_prefilled = {}
        if batch is None:
            return []
        self.last_batch = batch
        for seq in batch.seqs[batch.num_decode :]:
            if seq.prefill_started is None:
                seq.prefill_started = start
        # Failures outside the per-request runs (scheduling, bookkeeping) propagate: the engine loop
        # marks its worker broken. Requests that fail alone never do, so no client can take it down.
        return self._run_batch(batch.seqs, batch.q_lens, batch.num_decode)

    def _run_batch(self, seqs: list[Sequence], q_lens: list[int], num_decode: int) -> list[TokenDelta]:
        """One forward over decode tokens and prefill chunks, then sampling for every sequence whose
        KV is now complete. A failure is narrowed down by running each request alone: the ones that
        fail alone end with an error, the others go on as if nothing happened."""
        cached = [s.num_cached for s in seqs]
        try:
            if self.fault_hook is not None:
                self.fault_hook("decode", [s.request_id for s in seqs[:num_decode]])
                self.fault_hook("prefill", [s.request_id for s in seqs[num_decode:]])
            self.encode(seqs[num_decode:])
            logits = self.runner.forward_step(seqs, q_lens)
            # A prefill chunk that leaves prompt tokens uncached samples nothing yet; a resumed prefill
            # recomputed tokens sampled elsewhere and samples nothing either.
            complete = [i for i, s in enumerate(seqs) if s.prefill_done]
            keep = [i for i in complete if not seqs[i].resume_pending]
            sampled = [seqs[i] for i in keep]
            tokens, logprobs = sample(logits[keep], sampled) if sampled else ([], [])
        except Exception as exc:  # noqa: BLE001 - contained per request below
            for seq, n in zip(seqs, cached, strict=True):
                seq.num_cached = n  # the KV written for these positions is rewritten on the rerun
            if len(seqs) == 1:
                return [self.fail(seqs[0], exc)]
            return [
                delta
                for i, (seq, q_len) in enumerate(zip(seqs, q_lens, strict=True))
                for delta in self._run_batch([seq], [q_len], int(i < num_decode))
            ]
        self.prefill_tokens_computed += sum(q_lens[num_decode:])
        for seq in seqs:
            self.scheduler.register_computed(seq)
        done = time.perf_counter()
        for i in complete:
            if i >= num_decode:
                seq = seqs[i]
                started = seq.prefill_started or done
                self.last_prefilled[seq.request_id] = StageTimings(
                    prefill_s=done - started, prefill_queue_s=max(0.0, started - seq.queued_at)
                )
        deltas = [self._resumed(seqs[i]) for i in complete if seqs[i].resume_pending]
        for seq, token, lp in zip(sampled, tokens, logprobs, strict=True):
            try:
                deltas.append(self._advance(seq, token, lp))
            except Exception as exc:  # noqa: BLE001 - one request's bookkeeping failed: it alone ends
                deltas.append(self.fail(seq, exc))
        return deltas

    def _resumed(self, seq: Sequence) -> TokenDelta:
        """A resumed prefill recomputed KV for tokens sampled elsewhere: hand it on, sample nothing."""
        seq.resume_pending = False
        seq.image_embeds = None
        if seq.request_id in self._prefill_only:
            self._prefill_only.discard(seq.request_id)
            self._seqs.pop(seq.request_id, None)
            self.scheduler.hand_off(seq)
            self.held[seq.request_id] = seq
        else:
            self.scheduler.add_running(seq)
        return TokenDelta(seq.request_id, [], "")

    def _advance(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> TokenDelta:
        delta = seq.append(token, logprobs)
        if delta.finished:
            self.scheduler.finish(seq)
            self._seqs.pop(seq.request_id, None)
            self._prefill_only.discard(seq.request_id)
        elif seq.request_id in self._prefill_only:
            self._prefill_only.discard(seq.request_id)
            self._seqs.pop(seq.request_id)
            seq.image_embeds = None
            self.scheduler.hand_off(seq)
            self.held[seq.request_id] = seq
        elif seq.status != RequestStatus.RUNNING_DECODE:
            seq.image_embeds = None  # the prompt is in the KV cache now
            self.scheduler.add_running(seq)
        return delta

    def fail(self, seq: Sequence, exc: BaseException) -> TokenDelta:
        """End one request with an error and free what it held; the rest of the engine goes on. A
        `Rejected` (the request's own grammar at fault) carries its 4xx and is not the engine's
        failure."""
        rejection = exc.rejection if isinstance(exc, Rejected) else None
        if rejection is None:
            log.warning("request %s failed inside the engine: %r", seq.request_id, exc)
            self.requests_failed += 1
        seq.finish(FinishReason.ERROR)
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)
        self._prefill_only.discard(seq.request_id)
        error = rejection.message if rejection else "the request failed while generating"
        return TokenDelta(seq.request_id, [], "", FinishReason.ERROR, error=error, rejection=rejection)

    def encode(self, seqs: list[Sequence]) -> None:
        """Encode the images of every sequence that lacks embeddings, in vision batches of bounded size.
        A sequence whose every image pad lies in its cached prefix needs none: nothing it computes is
        an image token."""
        pads = self.model_config.media_pad_ids
        todo = [
            (seq, im)
            for seq in seqs
            if seq.image_embeds is None
            and seq.images
            and not (
                seq.num_prefix_hit and not any(p in seq.prompt_token_ids[seq.num_cached :] for p in pads)
            )
            for im in seq.images
        ]
        embeds: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(todo), self.cfg.max_encode_images):
            chunk = todo[start : start + self.cfg.max_encode_images]
            for (seq, _), emb in zip(chunk, self.runner.encode([im for _, im in chunk]), strict=True):
                embeds.setdefault(seq.request_id, []).append(emb)
        for seq in seqs:
            if seq.request_id in embeds:
                items = [(im.grid_thw, im.video) for im in seq.images]
                rows, seq.kept = self.prune(embeds[seq.request_id], items, seq.keep)
                seq.image_embeds = torch.cat(rows)

    def prune(
        self, embeds: list[torch.Tensor], items: list[tuple[tuple[int, int, int], bool]], keep: list[int]
    ) -> tuple[list[torch.Tensor], list[list[int] | None] | None]:
        """Each item's embeddings (its (grid, is video) in `items`) cut to what pruning keeps (`keep`,
        per item; empty: all), and the kept tokens' indices (None for an item kept whole; None
        overall when nothing is pruned)."""
        if not keep:
            return embeds, None
        cfg, merge = self.cfg, self.model_config.vision.spatial_merge_size
        rows, kept = [], []
        for emb, (grid, video), k in zip(embeds, items, keep, strict=True):
            if k >= emb.shape[0]:
                rows.append(emb)
                kept.append(None)
                continue
            method = cfg.video_pruning_method if video else cfg.image_pruning_method
            index = pruning.select(emb, grid, merge, k, video, method)
            rows.append(emb.index_select(0, index.to(emb.device)))
            kept.append(index.tolist())
        return rows, kept

    # -- convenience ------------------------------------------------------------------------------

    def generate(self, requests: list[tuple[Prompt, SamplingParams]]) -> list[GenerationResult]:
        """Run requests to completion together; results in the order given."""
        ids = [self.add_request(prompt, params) for prompt, params in requests]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        texts: dict[str, list[str]] = {i: [] for i in ids}
        reasons: dict[str, FinishReason] = {}
        while self.has_unfinished():
            for delta in self.step():
                tokens[delta.request_id].extend(delta.token_ids)
                texts[delta.request_id].append(delta.text)
                if delta.finish_reason is not None:
                    reasons[delta.request_id] = delta.finish_reason
        return [GenerationResult(i, tokens[i], "".join(texts[i]), reasons[i]) for i in ids]
