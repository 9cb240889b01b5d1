"""Shared vocabulary of the serving system: request status, sampling parameters, token deltas."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestStatus(enum.IntEnum):
    """Where a request is in its life. Ordered: every status after RUNNING_DECODE is final."""

    WAITING = 0
    RUNNING_ENCODE = 1
    RUNNING_PREFILL = 2
    RUNNING_DECODE = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class FinishReason(enum.StrEnum):
    """OpenAI's finish reasons, plus the two ends a server needs that a model does not produce."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


class Role(enum.StrEnum):
    """The stage a worker serves; colocated roles name several stages."""

    ENCODE = "e"
    PREFILL = "p"
    DECODE = "d"


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 means greedy. `seed` makes sampling reproducible for this request alone, whatever
    else shares its batch. `stop` strings are matched on detokenized text and cut from the output.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be non-negative")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be non-negative (0 disables it)")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be between 0 and 20")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenDelta:
    """What a request produced since its last delta: new token ids, their text, and how it ended."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    logprobs: list[dict[int, float]] | None = None
    num_prompt_tokens: int = 0
    num_image_tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)  # per-stage timings, on the last delta
    error: str | None = None  # what failed, safe to show a client, when finish_reason is ERROR

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


Region = tuple[int, int]  # (byte offset inside a registered buffer, byte count)


@dataclass(frozen=True)
class RemoteRegions:
    """What a receiver needs to pull: the owner, which of its buffers, the byte ranges, and the
    transport's own serialized descriptors for them."""

    peer: str
    buffer: str
    regions: tuple[Region, ...]
    descriptors: bytes = b""

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.regions)


@dataclass(frozen=True)
class PromptSpec:
    """A tokenized prompt as it crosses the wire: token ids (image pads expanded) and image grids."""

    token_ids: list[int]
    grids: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class EmbeddingRef:
    """A request's visual embeddings (packed, prompt order) held by an encode worker under a lease."""

    source: RemoteRegions
    num_tokens: int
    lease_id: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class KVRef:
    """A prefilled request's KV blocks held by a prefill worker under a lease, with what decode needs
    to continue it."""

    source: RemoteRegions
    num_tokens: int
    first_token: int
    rope_delta: int
    lease_id: str


@dataclass
class PrefillResult:
    """A prefill's answer: the first token, and the KV to continue from unless that token ended it."""

    delta: TokenDelta
    kv: KVRef | None
    timings: dict[str, float] = field(default_factory=dict)
