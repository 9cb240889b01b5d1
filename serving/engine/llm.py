"""The engine in one process: encode → prefill → decode with continuous batching.

Lifecycle of a request inside the engine:
  1. add_request: the prompt (tokens with expanded image pads, preprocessed images) becomes a Sequence
     in the waiting queue; a request that could never fit the KV pool is refused here.
  2. step (prefill): the scheduler admits waiting requests under the token budget and KV room; their
     images are encoded in one vision-tower batch, their prompts prefilled in one forward, and a first
     token sampled for each.
  3. step (decode): every running request feeds its newest token; one forward for the whole batch.
  4. After each step: tokens are appended, detokenized and checked against the stop rules; finished
     requests leave the batch and give their KV blocks back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from serving.config import EngineConfig
from serving.engine.image_processor import ImageProcessor, ImageProcessorConfig
from serving.engine.inputs import InputProcessor, Prompt
from serving.engine.models.config import load_model_config
from serving.engine.runner import ModelRunner
from serving.engine.sampler import sample
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence
from serving.engine.tokenizer import Tokenizer
from serving.types import FinishReason, SamplingParams, TokenDelta


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
            self.model_config, self.tokenizer, ImageProcessor(ImageProcessorConfig.from_dir(cfg.model))
        )
        self.runner = ModelRunner(cfg, self.model_config)
        self.scheduler = Scheduler(cfg, self.runner.pool)
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------------

    def make_sequence(self, request_id: str, prompt: Prompt, params: SamplingParams) -> Sequence:
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
            num_image_tokens=sum(self.model_config.num_image_tokens(im.grid_thw) for im in prompt.images),
        )
        if self.runner.pool.blocks_for(seq.max_len) > self.runner.pool.num_blocks:
            raise ValueError("request needs more KV cache than this worker has")
        return seq

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = self.make_sequence(request_id, prompt, params)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        if seq := self._seqs.pop(request_id, None):
            seq.finish(FinishReason.ABORT)
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[TokenDelta]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        if batch.stage == "prefill":
            self.encode(batch.seqs)
            logits = self.runner.prefill(batch.seqs)
        else:
            logits = self.runner.decode_step(batch.seqs)
        return self.postprocess(batch.seqs, logits)

    def encode(self, seqs: list[Sequence]) -> None:
        """Encode the images of every sequence that lacks embeddings, in vision batches of bounded size."""
        todo = [(seq, im) for seq in seqs if seq.image_embeds is None for im in seq.images]
        embeds: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(todo), self.cfg.max_encode_images):
            chunk = todo[start : start + self.cfg.max_encode_images]
            for (seq, _), emb in zip(chunk, self.runner.encode([im for _, im in chunk]), strict=True):
                embeds.setdefault(seq.request_id, []).append(emb)
        for seq in seqs:
            if seq.request_id in embeds:
                seq.image_embeds = torch.cat(embeds[seq.request_id])

    def postprocess(self, seqs: list[Sequence], logits: torch.Tensor) -> list[TokenDelta]:
        tokens, logprobs = sample(logits, seqs)
        deltas = []
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            delta = seq.append(token, lp)
            deltas.append(delta)
            if delta.finished:
                self.scheduler.finish(seq)
                self._seqs.pop(seq.request_id, None)
            elif seq not in self.scheduler.running:
                seq.image_embeds = None  # the prompt is in the KV cache now
                self.scheduler.add_running(seq)
        return deltas

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
