"""The typed generation request both front ends build, and its checks.

The OpenAI routes parse JSON into their pydantic schemas first (strict types, the OpenAI error
messages); gRPC gets its types from protobuf. Either way the request arrives here as a
`GenerateRequest` and `check_bounds` applies the documented bounds (the same as
`serving/gateway/schemas.py`), so both front ends refuse the same values.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any

from serving.api.errors import invalid_value
from serving.engine.stop import MAX_STOP_LENGTH, MAX_STOP_STRINGS

MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_N = 16
MAX_LOGPROBS = 20
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_MODES = ("none", "auto", "required", "function")
NO_ARGUMENTS = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}  # a tool without parameters
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class TextInput:
    text: str


@dataclass(frozen=True)
class ImageInput:
    """An image by URL (data: or http(s)) or as encoded bytes; `param` names it in error messages."""

    url: str = ""
    data: bytes | None = None
    param: str = "image"
    detail: str | None = None  # "low", "high", "auto" (serving/api/budgets.py)
    uuid: str | None = None  # the client's name for it; alone, the image sent before under it

    @property
    def source(self) -> str | bytes:
        return self.data if self.data is not None else self.url


@dataclass(frozen=True)
class VideoInput:
    """A video by URL (data: or http(s)) or as encoded bytes (MP4, WebM, MKV, …)."""

    url: str = ""
    data: bytes | None = None
    param: str = "video"
    uuid: str | None = None

    @property
    def source(self) -> str | bytes:
        return self.data if self.data is not None else self.url


Part = TextInput | ImageInput | VideoInput


@dataclass(frozen=True)
class ToolCall:
    """A function call the assistant made: `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    role: str
    content: str | tuple[Part, ...] | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


@dataclass(frozen=True)
class Tool:
    """A function the model may call; `parameters` is its arguments' JSON schema."""

    name: str
    parameters: dict = field(default_factory=lambda: dict(NO_ARGUMENTS))
    description: str | None = None
    strict: bool = False


class OutputKind(enum.StrEnum):
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"  # a Lark grammar (llguidance's dialect)


@dataclass(frozen=True)
class OutputFormat:
    """What the output must match: `spec` is the schema (a dict), the regex, the choices (a tuple of
    strings) or the grammar's text; `param` names the field it came from in error messages."""

    kind: OutputKind
    spec: Any = None
    param: str = "response_format"


@dataclass(frozen=True)
class ToolChoice:
    """`none`, `auto`, `required`, or `function` with the name of the one function to call."""

    mode: str = "auto"
    name: str | None = None


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[str, float], ...] = ()  # token ids as the client wrote them (strings)
    min_p: float = 0.0
    visual_kv_budget: float | None = None  # None: the server's (`--visual-kv-budget`)


@dataclass(frozen=True)
class GenerateRequest:
    """A chat (`messages`) or plain-text prompts (`prompts` set, each run `n` times), never both."""

    model: str
    messages: tuple[Message, ...] = ()
    prompts: tuple[str, ...] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    n: int = 1
    prompt_param: str = "prompt"  # the field a refused prompt is named by
    output: OutputFormat | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    video_fps: float | None = None  # media_io_kwargs.video: frames sampled per second of video …
    video_num_frames: int | None = None  # … or how many, spread evenly (not both)
    min_pixels: int | None = None  # mm_processor_kwargs: each image's pixel budget (budgets.py)
    max_pixels: int | None = None
    image_pruning_rate: float | None = None  # mm_processor_kwargs: tokens pruned at the encoder
    video_pruning_rate: float | None = None

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
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not (math.isfinite(value) and -2 <= value <= 2):
            raise invalid_value(name, "must be between -2 and 2")
    if not (math.isfinite(s.repetition_penalty) and 0 < s.repetition_penalty <= 2):
        raise invalid_value("repetition_penalty", "must be greater than 0 and at most 2")
    if not (math.isfinite(s.min_p) and 0 <= s.min_p <= 1):
        raise invalid_value("min_p", "must be between 0 and 1")
    if s.visual_kv_budget is not None and not (
        math.isfinite(s.visual_kv_budget) and 0 < s.visual_kv_budget <= 1
    ):
        raise invalid_value("visual_kv_budget", "must be above 0 and at most 1")
    _check_logit_bias(s.logit_bias)
    if request.video_fps is not None and request.video_num_frames is not None:
        raise invalid_value("media_io_kwargs.video", "give fps or num_frames, not both")
    if request.video_fps is not None and not (
        math.isfinite(request.video_fps) and 0 < request.video_fps <= 60
    ):
        raise invalid_value("media_io_kwargs.video.fps", "must be greater than 0 and at most 60")
    if request.video_num_frames is not None:
        _range("media_io_kwargs.video.num_frames", request.video_num_frames, 1, 1024)
    _check_tools(request)
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
        answered = request.messages[i - 1] if i else None
        if message.role == "tool" and not (answered and (answered.tool_calls or answered.role == "tool")):
            # As OpenAI: a tool result answers the calls of the assistant message before it.
            raise invalid_value(
                f"messages.{i}.role", "a tool message must follow an assistant message's tool_calls"
            )
        for j, part in enumerate(message.content if isinstance(message.content, tuple) else ()):
            if (
                isinstance(part, ImageInput | VideoInput)
                and part.data is None
                and not part.url
                and not part.uuid
            ):
                raise invalid_value(
                    part.param or f"messages.{i}.content.{j}", "media needs data, a url or a uuid"
                )


def _check_logit_bias(entries: tuple[tuple[str, float], ...]) -> None:
    """Keys are token ids written as strings; whether each is in the vocabulary is checked where the
    vocabulary is known (`logit_bias_ids`)."""
    if len(entries) > MAX_LOGIT_BIAS:
        raise invalid_value("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
    for key, bias in entries:
        if not key.isdecimal():
            raise invalid_value(f"logit_bias.{key[:40]}", "keys are token ids (strings of digits)")
        if not (math.isfinite(bias) and -100 <= bias <= 100):
            raise invalid_value(f"logit_bias.{key[:40]}", "must be between -100 and 100")


def logit_bias_ids(entries: tuple[tuple[str, float], ...], vocab_size: int) -> tuple[tuple[int, float], ...]:
    out = []
    for key, bias in entries:
        # A key of more digits than any vocabulary's size is past it (and past what int() parses).
        token = int(key) if len(key) <= 18 else vocab_size
        if token >= vocab_size:
            raise invalid_value(
                f"logit_bias.{key[:40]}", f"is not a token id (the vocabulary has {vocab_size})"
            )
        out.append((token, bias))
    return tuple(out)


def _check_tools(request: GenerateRequest) -> None:
    if len(request.tools) > MAX_TOOLS:
        raise invalid_value("tools", f"at most {MAX_TOOLS} tools")
    names = set()
    for i, tool in enumerate(request.tools):
        if not TOOL_NAME.fullmatch(tool.name):
            raise invalid_value(f"tools.{i}.function.name", "must be 1 to 64 letters, digits, '_' or '-'")
        if tool.name in names:
            raise invalid_value(f"tools.{i}.function.name", f"'{tool.name}' is defined twice")
        names.add(tool.name)
        if not isinstance(tool.parameters, dict):
            raise invalid_value(f"tools.{i}.function.parameters", "must be a JSON schema object")
    choice = request.tool_choice
    if choice.mode not in TOOL_MODES:
        raise invalid_value("tool_choice", 'must be "none", "auto", "required" or a named function')
    if choice.mode in ("required", "function") and not request.tools:
        raise invalid_value("tool_choice", f"{choice.mode!r} needs tools")
    if choice.mode == "function" and choice.name not in names:
        raise invalid_value("tool_choice", f"there is no tool named '{str(choice.name)[:64]}'")
    if request.output is not None and request.tools and choice.mode in ("required", "function"):
        raise invalid_value("response_format", "a forced tool call and a response format cannot both apply")


def _range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise invalid_value(name, f"must be between {low} and {high}")
