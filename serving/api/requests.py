"""The typed generation request both front ends build, and its checks.

The OpenAI routes parse JSON into their pydantic schemas first (strict types, the OpenAI error
messages); gRPC gets its types from protobuf. Either way the request arrives here as a
`GenerateRequest` and `check_bounds` applies the documented bounds (the same as
`serving/gateway/schemas.py`), so both front ends refuse the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serving.api.errors import invalid_value
from serving.engine.stop import MAX_STOP_LENGTH, MAX_STOP_STRINGS

MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_N = 16
MAX_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class TextInput:
    text: str


@dataclass(frozen=True)
class ImageInput:
    """An image by URL (data: or http(s)) or as encoded bytes; `param` names it in error messages."""

    url: str = ""
    data: bytes | None = None
    param: str = "image"

    @property
    def source(self) -> str | bytes:
        return self.data if self.data is not None else self.url


Part = TextInput | ImageInput


@dataclass(frozen=True)
class Message:
    role: str
    content: str | tuple[Part, ...] | None = None


@dataclass(frozen=True)
class Sampling:
    """None: the server's default (OpenAI's)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and k alternatives


@dataclass(frozen=True)
class GenerateRequest:
    """A chat (`messages`) or plain-text prompts (`prompts` set, each run `n` times), never both."""

    model: str
    messages: tuple[Message, ...] = ()
    prompts: tuple[str, ...] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    prompt_param: str = "prompt"  # the field a refused prompt is named by

    @property
    def is_chat(self) -> bool:
        return self.prompts is None


def check_bounds(request: GenerateRequest) -> None:
    """The documented bounds, named by field (400 invalid_value)."""
    s = request.sampling
    _range("n", request.n, 1, MAX_N)
    if s.max_tokens is not None:
        _range("max_tokens", s.max_tokens, 1, MAX_INT32)
    if s.temperature is not None and not (math.isfinite(s.temperature) and 0 <= s.temperature <= 2):
        raise invalid_value("temperature", "must be between 0 and 2")
    if s.top_p is not None and not (math.isfinite(s.top_p) and 0 < s.top_p <= 1):
        raise invalid_value("top_p", "must be greater than 0 and at most 1")
    if s.top_k is not None:
        _range("top_k", s.top_k, -1, MAX_INT32)
    if s.seed is not None:
        _range("seed", s.seed, 0, MAX_SEED)
    _range("min_tokens", s.min_tokens, 0, MAX_INT32)
    if s.logprobs is not None:
        _range("logprobs", s.logprobs, 0, MAX_LOGPROBS)
    if len(s.stop) > MAX_STOP_STRINGS:
        raise invalid_value("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for i, stop in enumerate(s.stop):
        if not 1 <= len(stop) <= MAX_STOP_LENGTH:
            raise invalid_value(f"stop.{i}", f"stop strings have 1 to {MAX_STOP_LENGTH} characters")
    if request.is_chat and not request.messages:
        raise invalid_value("messages", "give at least one message (or a prompt)")
    if not request.is_chat and request.messages:
        raise invalid_value("prompt", "give messages or a prompt, not both")
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise invalid_value(f"messages.{i}.role", f"must be one of {', '.join(ROLES)}")
        for j, part in enumerate(message.content if isinstance(message.content, tuple) else ()):
            if isinstance(part, ImageInput) and part.data is None and not part.url:
                raise invalid_value(part.param or f"messages.{i}.content.{j}", "an image needs data or a url")


def _range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise invalid_value(name, f"must be between {low} and {high}")
