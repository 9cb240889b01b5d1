"""A request as the engine sees it: tokens, KV blocks, positions, and the rules that end it."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from serving.engine.image_processor import ProcessedImage
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
    image_embeds: torch.Tensor | None = None  # the images' embeddings, packed in prompt order
    num_image_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # leading tokens whose keys and values are in the pool
    rope_delta: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    text: str = ""
    _held: str = ""  # text withheld from the stream while it could still become a stop string
    _generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def max_len(self) -> int:
        """Tokens this request may reach: what admission reserves KV blocks for."""
        return min(len(self.prompt_token_ids) + self.params.max_tokens, self.max_model_len)

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
    def suppressed_token_ids(self) -> tuple[int, ...]:
        """Stop tokens masked out while min_tokens is not reached yet."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return ()
        return tuple(self.params.stop_token_ids) + (() if self.params.ignore_eos else self.eos_token_ids)

    def append(self, token_id: int, logprobs: dict[int, float] | None = None) -> TokenDelta:
        """Record one sampled token and return what the client should see of it."""
        self.output_token_ids.append(token_id)
        reason = self._stop_token(token_id)
        piece = "" if reason else self.detokenizer.step(token_id)
        text = self._held + piece
        self._held = ""
        if reason is None and self.params.stop:
            text, reason = self._match_stop_strings(text)
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

    def _match_stop_strings(self, text: str) -> tuple[str, FinishReason | None]:
        """Cut the output at the first stop string; otherwise hold back a tail that may begin one."""
        window = self.text[-max(len(s) for s in self.params.stop) :] + text
        base = len(window) - len(text)
        hits = [i for s in self.params.stop if (i := window.find(s)) != -1]
        if hits and len(self.output_token_ids) >= self.params.min_tokens:
            return text[: max(0, min(hits) - base)], FinishReason.STOP
        hold = 0
        for s in self.params.stop:
            for n in range(min(len(s) - 1, len(window)), 0, -1):
                if window.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        hold = min(hold, len(text))
        if hold:
            self._held = text[len(text) - hold :]
            text = text[: len(text) - hold]
        return text, None
