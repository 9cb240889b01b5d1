"""OpenAI request bodies (chat completions, completions), validated strictly with their bounds.

Strict typing: a number is never read from a string (`"n": "2"`) or a boolean (`"max_tokens": true`), a
boolean never from a number; floats accept integers (JSON does not tell 1 from 1.0); NaN and infinities
are refused. Unknown fields are ignored (clients send `user`, `metadata`, `store`…), but fields that
would change the answer and that this server does not implement are refused by name unless they hold
their neutral value (`refusal()`), instead of being silently ignored.

Bounds, as documented for clients:

| field | bound |
|---|---|
| `max_tokens`, `max_completion_tokens` | 1 … 2**31 − 1 (and prompt + max_tokens ≤ the model length) |
| `min_tokens` | 0 … max_tokens |
| `temperature` | 0 … 2 (below 1e-5 is greedy) |
| `top_p` | (0, 1] |
| `top_k` | −1 … 2**31 − 1 (−1 and 0 disable it; larger than the vocabulary keeps every token) |
| `n` | 1 … 16 (and prompts × n ≤ the gateway's `max_sequences_per_request`) |
| `seed` | 0 … 2**63 − 1 |
| `stop` | up to 16 strings of 1 … 1024 characters |
| `logprobs` (completions) / `top_logprobs` (chat) | 0 … 5 / 0 … 20 |
| `presence_penalty`, `frequency_penalty` | −2 … 2 |
| `repetition_penalty` | (0, 2] |
| `min_p` | 0 … 1 |
| `visual_kv_budget` (extension) | (0, 1] |
| `mm_processor_kwargs.*_pruning_rate` | [0, 1), at most the server's `--max-pruning-rate` |
| `logit_bias` | up to 300 token ids (as strings) → −100 … 100 |
| `tools` | up to 128, names of 1 … 64 letters, digits, `_`, `-` |
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving.engine.stop import MAX_STOP_LENGTH, MAX_STOP_STRINGS

MAX_INT32 = 2**31 - 1


class _Body(BaseModel):
    # Clients send fields we do not use; like vLLM, ignore them (the ones that matter are refused below).
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class ImageURL(_Body):
    url: str | None = Field(None, min_length=1)  # none: the part's `uuid` names an image sent before
    detail: Literal["auto", "low", "high"] | None = None  # the image's pixel budget (api/budgets.py)


class TextPart(_Body):
    type: Literal["text"]
    text: str


Uuid = Annotated[str, Field(min_length=1, max_length=256)]


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL | None = None
    uuid: Uuid | None = None  # vLLM's media identity: with no url, the image sent before under it


class VideoURL(_Body):
    url: str | None = Field(None, min_length=1)


class VideoPart(_Body):
    type: Literal["video_url"]
    video_url: VideoURL | None = None
    uuid: Uuid | None = None


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class VideoIO(_Body):
    fps: float | None = Field(None, gt=0, le=60)
    num_frames: int | None = Field(None, ge=1, le=1024)


class ProcessorKwargs(_Body):
    """vLLM's `mm_processor_kwargs`: each image's pixel budget, inside the model's range; the share of
    image and video tokens pruned at the encoder (up to the server's maximum)."""

    min_pixels: int | None = Field(None, ge=1, le=2**31 - 1)
    max_pixels: int | None = Field(None, ge=1, le=2**31 - 1)
    image_pruning_rate: float | None = Field(None, ge=0, lt=1)
    video_pruning_rate: float | None = Field(None, ge=0, lt=1)


class MediaIO(_Body):
    """vLLM's `media_io_kwargs`: how a video's frames are sampled."""

    video: VideoIO | None = None


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallBody(_Body):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result: the call it answers


class FunctionDefinition(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class JSONSchemaFormat(_Body):
    name: str = "schema"
    description: str | None = None
    # "schema" shadows a BaseModel attribute in pydantic: read under another name.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's extension: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = None
    json_object: bool | None = None


class StreamOptions(_Body):
    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


class SamplingFields(_Body):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32)
    n: int = Field(1, ge=1, le=16)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=MAX_INT32)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    min_p: float | None = Field(None, ge=0, le=1)
    # Extension (as vLLM takes extra sampling fields): the share of visual tokens whose KV decode gets.
    visual_kv_budget: float | None = Field(None, gt=0, le=1)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names for structured_outputs' fields
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    guided_grammar: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_count(cls, value: Any) -> Any:
        # Checked first: as one branch of a union, a list too long failed with "should be a valid string".
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(value)}")
        return value

    def refusal(self) -> tuple[str, str] | None:
        """(field, message) for the first field asking for something this server does not do."""
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true."
        return None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    media_io_kwargs: MediaIO | None = None
    mm_processor_kwargs: ProcessorKwargs | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    def refusal(self) -> tuple[str, str] | None:
        if found := super().refusal():
            return found
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "logprobs must be true when top_logprobs is given."
        if self.functions:
            return "functions", "functions are deprecated and not supported; use tools."
        if self.function_call not in (None, "none", "auto"):
            return "function_call", "function_call is deprecated and not supported; use tool_choice."
        if self.modalities not in (None, ["text"]):
            return "modalities", "Only the text output modality is supported."
        for name in ("audio", "prediction", "web_search_options"):
            if getattr(self, name) is not None:
                return name, f"{name} is not supported."
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1, le=MAX_INT32)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=16)

    def refusal(self) -> tuple[str, str] | None:
        if found := super().refusal():
            return found
        if self.echo:
            return "echo", "echo is not supported."
        if self.suffix:
            return "suffix", "suffix is not supported."
        if self.best_of not in (None, self.n):
            return "best_of", "best_of is not supported; leave it out or set it equal to n."
        return None
