"""A request as the engine sees it: tokens, KV blocks, positions, and the rules that end it."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from serving.engine import structured
from serving.engine.image_processor import ProcessedImage
from serving.engine.stop import StopMatcher
from serving.engine.tokenizer import Detokenizer
from serving.types import FinishReason, RequestStatus, SamplingParams, TokenDelta


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: Detokenizer
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    images: list[ProcessedImage] = field(default_factory=list)
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    video_seconds: list[float] = field(default_factory=list)  # per video: seconds per temporal patch
    image_embeds: torch.Tensor | None = None  # the images' embeddings, packed in prompt order
    keep: list[int] = field(default_factory=list)  # per item, the tokens pruning keeps (empty: all)
    kept: list[list[int] | None] | None = None  # per item, which (set with the embeddings)
    num_image_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # leading tokens whose keys and values are in the pool
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hash of each full prompt block
    num_registered: int = 0  # leading blocks of block_table already offered to the prefix cache
    num_prefix_hit: int = 0  # leading prompt tokens whose KV came from the prefix cache
    rope_delta: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    text: str = ""
    prefill_only: bool = False  # stops after its prefill; its KV is handed to a decode worker
    kv_scores: torch.Tensor | None = None  # visual-KV compaction: attention each position received
    resume_pending: bool = False  # restored outputs whose KV a prefill must recompute, not sample
    prompt_positions: torch.Tensor | None = None  # (3, prompt) M-RoPE positions, made on the first chunk
    queued_at: float = 0.0  # perf_counter when it joined the scheduler's waiting queue
    prefill_started: float | None = None  # perf_counter at the start of the step that took its first chunk
    matcher: Any = None  # the request's grammar state (an llguidance matcher), when it has a grammar
    penalty_prompt: torch.Tensor | None = None  # the prompt's distinct tokens, for the penalties
    _held: str = ""  # text withheld from the stream while it could still become a stop string
    _generator: torch.Generator | None = None
    _key_base: int | None = None
    _stops: StopMatcher | None = None  # incremental stop-string matcher, made on the first token

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_len(self) -> int:
        """Tokens this request may reach here: what admission reserves KV blocks for. A prefill-only
        request never grows past its prompt (and restored outputs) plus the token it samples."""
        if self.prefill_only:
            return min(self.num_tokens + 1, self.max_model_len)
        return min(len(self.prompt_token_ids) + self.params.max_tokens, self.max_model_len)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens whose KV a prefill computes: the prompt, plus restored outputs but the newest (a
        migrated request's next decode step feeds that one)."""
        return self.num_tokens - 1 if self.resume_pending else self.num_tokens

    @property
    def prefill_done(self) -> bool:
        return self.num_cached >= self.num_prefill_tokens

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + outputs, without copying the whole context."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def generator(self) -> torch.Generator:
        """The random source for this request's next token. Seeded requests derive it from (seed,
        output index) alone, so a request samples the same tokens on whichever worker each step runs."""
        if self.params.seed is not None:
            step_seed = (self.params.seed * 1_000_003 + len(self.output_token_ids)) % 2**63
            return torch.Generator().manual_seed(step_seed)
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(random.getrandbits(63))
        return self._generator

    @property
    def sampling_key(self) -> tuple[int, int]:
        """The key of the device draw for the next token (`sampler.draw`): a function of (seed, output
        index) alone for a seeded request, of a random base drawn once for the others."""
        if self.params.seed is not None:
            base = self.params.seed
        else:
            if self._key_base is None:
                self._key_base = random.getrandbits(63)
            base = self._key_base
        digest = hashlib.blake2b(f"{base}:{len(self.output_token_ids)}".encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        return value & 0xFFFFFFFF, value >> 32

    @property
    def suppressed_token_ids(self) -> tuple[int, ...]:
        """Stop tokens masked out while min_tokens is not reached yet."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return ()
        return tuple(self.params.stop_token_ids) + (() if self.params.ignore_eos else self.eos_token_ids)

    def append(self, token_id: int, logprobs: dict[int, float] | None = None) -> TokenDelta:
        """Record one sampled token and return what the client should see of it."""
        if self.matcher is not None:
            structured.consume(self.matcher, token_id)
        self.output_token_ids.append(token_id)
        reason = self._stop_token(token_id)
        piece = "" if reason else self.detokenizer.step(token_id)
        text = self._held + piece
        self._held = ""
        if reason is None and self.params.stop:
            text, reason = self._match_stop_strings(text, piece)
        if reason is None and (
            len(self.output_token_ids) >= self.params.max_tokens or self.num_tokens >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            text, self._held = text + self._held, ""
            self.finish(reason)
        self.text += text
        return TokenDelta(
            request_id=self.request_id,
            token_ids=[token_id],
            text=text,
            finish_reason=reason,
            logprobs=[logprobs] if logprobs is not None else None,
            num_prompt_tokens=len(self.prompt_token_ids),
            num_image_tokens=self.num_image_tokens,
        )

    def restore(self, token_ids: list[int]) -> None:
        """Replay outputs another worker already produced and streamed (a migrated request): the stop
        rules, the detokenizer and the held-back text end up exactly where they were there."""
        for token_id in token_ids:
            if self.append(token_id).finished:
                raise ValueError("the restored outputs already end the request")

    def finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self.status = {
            FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
            FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
            FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
            FinishReason.ERROR: RequestStatus.FINISHED_ERROR,
        }[reason]

    def _stop_token(self, token_id: int) -> FinishReason | None:
        if len(self.output_token_ids) < self.params.min_tokens:
            return None
        if token_id in self.params.stop_token_ids:
            return FinishReason.STOP
        if not self.params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        return None

    def _match_stop_strings(self, text: str, piece: str) -> tuple[str, FinishReason | None]:
        """Cut the output at the first stop string completed by `piece`; otherwise hold back the tail of
        `text` (held text + piece) that may begin one. Only `piece` is scanned: earlier text already
        advanced the matcher, so the work per token does not grow with the output."""
        if self._stops is None:
            self._stops = StopMatcher(self.params.stop)
        hit = self._stops.feed(piece, report=len(self.output_token_ids) >= self.params.min_tokens)
        if hit is not None:
            end, length = hit
            return text[: max(0, len(text) - len(piece) + end - length)], FinishReason.STOP
        hold = min(self._stops.partial, len(text))
        if hold:
            self._held = text[len(text) - hold :]
            text = text[: len(text) - hold]
        return text, None
