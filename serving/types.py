"""Shared vocabulary of the serving system: request status, sampling parameters, token deltas."""

from __future__ import annotations

import enum
import hashlib
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
    """A stage a worker serves. A worker holds a set of roles; colocated workers hold several."""

    ENCODE = "e"
    PREFILL = "p"
    DECODE = "d"


Roles = frozenset[Role]
ALL_ROLES: Roles = frozenset(Role)


def parse_roles(text: str) -> Roles:
    """'e', 'pd', 'epd', 'e,p' → a role set; anything else is a ValueError."""
    letters = [c for c in text.strip().lower() if c not in ", +"]
    if not letters:
        raise ValueError("a worker needs at least one role (e, p, d)")
    try:
        roles = frozenset(Role(c) for c in letters)
    except ValueError:
        raise ValueError(f"unknown role in {text!r}; roles are e, p and d") from None
    if len(roles) != len(letters):
        raise ValueError(f"a role is repeated in {text!r}")
    return roles


def roles_label(roles: Roles) -> str:
    """The canonical short name of a role set, in stage order: 'e', 'pd', 'epd'."""
    return "".join(r.value for r in Role if r in roles)


class WorkerPhase(enum.StrEnum):
    """Where a worker is in its life: starting → active ⇄ draining → reconfiguring → active, or
    stopped / failed. Only active workers are routed new work."""

    STARTING = "starting"
    ACTIVE = "active"
    DRAINING = "draining"
    RECONFIGURING = "reconfiguring"
    STOPPED = "stopped"
    FAILED = "failed"


GREEDY_EPSILON = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 means greedy, and so does any temperature below `GREEDY_EPSILON` (as in vLLM): dividing
    logits by 1e-300 would overflow, and such a temperature is greedy in all but name. `seed` makes
    sampling reproducible for this request alone, whatever else shares its batch. `stop` strings are
    matched on detokenized text and cut from the output. The penalties, `logit_bias` and `grammar`
    change the logits greedy decoding sees too; `min_p` (like top-k and top-p) only what is sampled.
    Their state is the request's tokens, so it moves with the request wherever it runs.
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
    presence_penalty: float = 0.0  # OpenAI's: minus this from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: minus this times the token's count in the output
    repetition_penalty: float = 1.0  # CTRL's (vLLM, transformers): prompt and output tokens damped
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    grammar: str | None = None  # an llguidance grammar the output must match (engine/structured.py)
    # Share of the prompt's visual tokens whose KV a prefill worker hands to decode (1: all; lossy
    # below: serving/engine/compaction.py).
    visual_kv_budget: float = 1.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError("temperature must be non-negative")
        if self.temperature < GREEDY_EPSILON:
            object.__setattr__(self, "temperature", 0.0)  # frozen: normalised once, here
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be non-negative (0 disables it)")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be between 0 and 20")
        if not 0 < self.visual_kv_budget <= 1:
            raise ValueError("visual_kv_budget must be in (0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be between -2 and 2")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError("repetition_penalty must be greater than 0 and at most 2")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be between 0 and 1")
        if any(not -100 <= bias <= 100 or token < 0 for token, bias in self.logit_bias):
            raise ValueError("logit_bias maps token ids to values between -100 and 100")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

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
    timings: StageTimings | None = None  # per-stage timings: on the first delta of a leg and the last
    error: str | None = None  # what failed, safe to show a client, when finish_reason is ERROR
    failed_stage: Role | None = None  # which stage failed it, when finish_reason is ERROR and known
    rejection: Rejection | None = None  # the client's own fault, found past the gateway: its 4xx

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
    epoch: int = 0  # the owner's registration epoch: a receiver that knows another one must not read

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.regions)


@dataclass(frozen=True)
class PromptSpec:
    """A tokenized prompt as it crosses the wire: token ids (image pads expanded) and image grids."""

    token_ids: list[int]
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    # Per video, in prompt order: seconds of video per temporal patch (Qwen2.5-VL's positions need it;
    # missing entries are 1.0, transformers' default: 2 frames at 2 fps).
    video_seconds: list[float] = field(default_factory=list)
    # Per item, the tokens pruning at the encoder keeps (`serving.engine.pruning.kept_count`); empty
    # when nothing is pruned.
    keep: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class MediaItem:
    """An image or video as the gateway ships it to the worker that encodes it: its compressed bytes
    and the plan the gateway made from their headers (the size to encode at, the frames to take), so
    the prompt's pads and the encoder's grid cannot disagree. `key` names the result for the encode
    cache and affinity routing: the bytes' hash and the plan, so the same picture at another budget
    or sampling is another entry."""

    data: bytes
    video: bool
    size: tuple[int, int]  # (height, width) to encode at: an image's budgeted size, a video's frames'
    frames: tuple[int, ...] = ()  # a video's frames to decode, by index
    param: str = "messages"  # the request field it came from, for a rejection
    max_pixels: int = 0  # the server's per-image (per-frame) limit, checked again before decoding
    timeout_s: float = 20.0  # decoding it may take no longer
    key: str = ""

    @staticmethod
    def digest(data: bytes, video: bool, size: tuple[int, int], frames: tuple[int, ...]) -> str:
        h = hashlib.blake2b(data, digest_size=16)
        h.update(repr((video, size, frames)).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class EmbeddingRef:
    """A request's visual embeddings (packed, prompt order) held by an encode worker under a lease."""

    source: RemoteRegions
    num_tokens: int
    lease_id: str
    timings: StageTimings | None = None
    kept: list[list[int] | None] | None = None  # per item, the token indices pruning kept (None: all)


@dataclass(frozen=True)
class KVRef:
    """A prefilled request's KV blocks held by a prefill worker under a lease, with what decode needs
    to continue it."""

    source: RemoteRegions
    num_tokens: int
    first_token: int
    rope_delta: int
    lease_id: str
    quantized: bool = False  # int8 staging blocks with scales (`KVStaging`), not the pool's own
    # Visual-KV compaction: the prompt positions whose KV was kept, in order; None when all were. The
    # decode worker's prompt is those tokens, and it recomputes any streamed outputs over them.
    kept: tuple[int, ...] | None = None


@dataclass
class PrefillResult:
    """A prefill's answer: the first token, and the KV to continue from unless that token ended it."""

    delta: TokenDelta
    kv: KVRef | None
    timings: StageTimings | None = None


@dataclass
class StageTimings:
    """Where one request's time went, stage by stage (seconds, and bytes moved between stages).
    Each stage fills its own fields; the orchestrator merges them into the request's total."""

    media_s: float | None = None  # decoding and preprocessing the media that missed the cache
    encode_s: float | None = None  # the vision batch
    encode_queue_s: float | None = None  # from the hand-over to the engine thread to its vision batch
    e2p_transfer_s: float | None = None
    e2p_bytes: float | None = None
    prefill_s: float | None = None
    prefill_queue_s: float | None = None
    p2d_transfer_s: float | None = None
    p2d_bytes: float | None = None
    decode_s: float | None = None
    e2e_s: float | None = None
    migrations: int = 0

    def merge(self, other: StageTimings | None) -> StageTimings:
        """Take every field `other` has set (later legs overwrite earlier ones); returns self."""
        if other is not None:
            for name, value in vars(other).items():
                if value is not None and name != "migrations":
                    setattr(self, name, value)
            self.migrations = max(self.migrations, other.migrations)
        return self

    def as_dict(self) -> dict[str, float]:
        """The fields that are set, for logs and JSON answers."""
        return {k: float(v) for k, v in vars(self).items() if v is not None and (k != "migrations" or v)}


@dataclass(frozen=True)
class WorkerInfo:
    """What the control plane learns of a worker when it starts or is reconfigured: its transport
    endpoint under a metadata epoch (bumped each time its registered memory changes)."""

    name: str
    roles: Roles
    metadata: bytes
    epoch: int
    pid: int
    node: str


@dataclass(frozen=True)
class WorkerStats:
    """One worker's load and health, as its stats call reports it."""

    name: str
    roles: Roles
    phase: WorkerPhase
    pid: int
    node: str
    kv_blocks_total: int
    kv_blocks_used: int
    num_running: int
    num_waiting: int
    num_held: int
    requests_in_flight: int  # requests the worker's ledger holds anything for
    embedding_slots_total: int
    embedding_slots_free: int
    mm_cache_hits: int
    mm_cache_misses: int
    mm_cache_entries: int
    images_encoded: int
    leases_active: int
    leases_released: int
    leases_expired: int
    requests_failed: int  # requests this worker failed alone (a fault inside one request)
    engine_alive: bool  # the engine thread is running and not stuck
    epoch: int
    prefix_cache_queried_tokens: int = 0  # prompt tokens of admitted requests, with prefix caching on
    prefix_cache_hit_tokens: int = 0  # of those, tokens whose KV the prefix cache supplied
    images_decoded: int = 0  # media the gateway shipped compressed, decoded here
    videos_decoded: int = 0
    visual_kv_kept: int = 0  # compacted handoffs: visual tokens' KV rows handed to decode …
    visual_kv_dropped: int = 0  # … and left behind
    kv_block_size: int = 0  # tokens per KV block: the pool holds kv_blocks_total × this many
    backend: str = ""  # the engine's attention backend: cpu (C kernels), triton (CUDA), torch
    kernels: str = ""  # the CPU kernels: built, off, no-compiler, failed (none on another device)

    @property
    def kv_tokens_total(self) -> int:
        return self.kv_blocks_total * self.kv_block_size

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


# -- what crosses a worker's boundary when something goes wrong --------------------------------------


class WorkerError(RuntimeError):
    """A worker could not do its part of a request; the orchestrator decides what happens next."""


class WorkerDied(WorkerError):
    """The worker's process is gone or does not answer: never route to it again."""


class WorkerUnavailable(WorkerError):
    """The worker is alive but does not take new work for this stage now (draining, switching roles,
    no room in time): try another worker."""


class TransferFailed(WorkerError):
    """A pull from a peer failed (the peer died, or its memory changed): the leg can be redone."""


class RequestFailed(WorkerError):
    """Something inside this one request failed on a healthy worker; redoing it would fail again.
    `stage` says which, where the failure knows it (it travels to the response and the metrics)."""

    def __init__(self, message: str = "", stage: Role | None = None) -> None:
        super().__init__(message)
        self.stage = stage

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.stage))  # the stage survives crossing a process


@dataclass(frozen=True)
class Rejection:
    """What a client sent that a worker found it cannot use (media that do not decode, a grammar past
    the parser's limits): the 4xx the client gets, and the request field at fault where one is."""

    status: int
    code: str
    param: str | None
    message: str


class Rejected(RequestFailed):
    """The client's request, found unusable past the gateway: its 4xx (`rejection`), never counted as
    the stage's failure."""

    def __init__(self, rejection: Rejection, stage: Role | None = None) -> None:
        super().__init__(rejection.message, stage)
        self.rejection = rejection

    def __reduce__(self) -> tuple:
        return (type(self), (self.rejection, self.stage))


def failure_of(delta: TokenDelta, fallback: str, stage: Role | None) -> RequestFailed:
    """What a worker's failed delta raises on the caller's side: its rejection (the client's 4xx) when
    it carries one, else the stage's failure."""
    if delta.rejection is not None:
        return Rejected(delta.rejection, stage)
    return RequestFailed(delta.error or fallback, stage)


class MediaRejected(Rejected):
    """An image or video that passed the gateway's header checks did not decode on the worker."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection, Role.ENCODE)

    def __reduce__(self) -> tuple:
        return (type(self), (self.rejection,))


class NoWorkerAvailable(RuntimeError):
    """No worker could take a stage of the request before its deadline: the client gets a 503."""

    def __init__(self, stage: Role) -> None:
        super().__init__(f"no {stage.name.lower()} worker is available")
        self.stage = stage
