"""From a checked request to the work it asks for: chat messages in template form with their images
counted, the per-request budgets (sequences, images, tokens, context length), and the sampling
parameters of each choice. Refusals here happen before any work (or, for tokens, before any run)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from serving.api.errors import APIError
from serving.api.media import MediaRef
from serving.api.requests import GenerateRequest, ImageInput, TextInput, VideoInput, logit_bias_ids
from serving.api.tools import template_calls
from serving.config import GatewayConfig
from serving.types import SamplingParams


def check_sequences(cfg: GatewayConfig, request: GenerateRequest) -> None:
    """A request runs prompts × n sequences: refused above the per-request budget (before any work)."""
    prompts = len(request.prompts or ("",))
    if prompts * request.n > cfg.max_sequences_per_request:
        param = request.prompt_param if prompts > 1 else "n"
        raise APIError(
            400,
            f"This request asks for {prompts * request.n} sequences (prompts × n); the server accepts at "
            f"most {cfg.max_sequences_per_request} per request.",
            param,
            "too_many_sequences",
        )


def check_tokens(cfg: GatewayConfig, tokens: int, param: str) -> None:
    """Prompt tokens (image tokens included) × n: refused above the per-request budget."""
    if tokens > cfg.max_request_tokens:
        raise APIError(
            400,
            f"This request's prompts come to {tokens} tokens across its sequences (image tokens "
            f"included); the server accepts at most {cfg.max_request_tokens} per request.",
            param,
            "request_too_large",
        )


def chat_messages(
    cfg: GatewayConfig, request: GenerateRequest
) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Messages in chat-template form, and the images and videos (counted here, before any is
    fetched)."""
    messages: list[dict[str, Any]] = []
    images: list[MediaRef] = []
    for message in request.messages:
        role = "system" if message.role == "developer" else message.role
        if message.role == "tool" or message.tool_calls:
            # Qwen2.5's template writes these turns' content as text: text parts are joined.
            content = message.content
            if isinstance(content, tuple):
                content = "".join(p.text for p in content if isinstance(p, TextInput))
            entry: dict[str, Any] = {"role": role, "content": content or ""}
            if message.tool_calls:
                entry["tool_calls"] = template_calls(message.tool_calls)
            messages.append(entry)
            continue
        if not isinstance(message.content, tuple):
            messages.append({"role": role, "content": message.content or ""})
            continue
        parts = []
        for part in message.content:
            if isinstance(part, ImageInput):
                images.append(MediaRef(part.source, part.param, detail=part.detail, uuid=part.uuid))
                parts.append({"type": "image"})
            elif isinstance(part, VideoInput):
                images.append(MediaRef(part.source, part.param, video=True, uuid=part.uuid))
                parts.append({"type": "video"})
            else:
                parts.append({"type": "text", "text": part.text})
        messages.append({"role": role, "content": parts})
    if len(images) > cfg.max_images_per_request:
        raise APIError(
            400, f"At most {cfg.max_images_per_request} images per request.", "messages", "too_many_images"
        )
    if sum(m.video for m in images) > cfg.max_videos_per_request:
        message = f"At most {cfg.max_videos_per_request} videos per request."
        raise APIError(400, message, "messages", "too_many_videos")
    return messages, images


def sampling_params(
    cfg: GatewayConfig,
    request: GenerateRequest,
    prompt_len: int,
    max_model_len: int,
    vocab_size: int,
    grammar: str | None = None,
) -> SamplingParams:
    """The request's sampling parameters for a prompt of `prompt_len` tokens (400 when the prompt and
    max_tokens do not fit the model); `grammar` is the checked grammar its output must match."""
    s = request.sampling
    room = max_model_len - prompt_len
    max_tokens = s.max_tokens if s.max_tokens is not None else min(cfg.default_max_tokens, room)
    if room < 1 or max_tokens > room:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens; the prompt "
            f"has {prompt_len} and {max_tokens} more were asked for.",
            "max_tokens",
            "context_length_exceeded",
        )
    if len(s.stop) > 16 or any(not stop for stop in s.stop):
        raise APIError(400, "stop must be up to 16 non-empty strings.", "stop")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if s.temperature is None else s.temperature,
            top_p=s.top_p or 1.0,
            top_k=max(s.top_k or 0, 0),
            seed=s.seed,
            stop=s.stop,
            ignore_eos=s.ignore_eos,
            min_tokens=s.min_tokens,
            logprobs=s.logprobs,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            logit_bias=logit_bias_ids(s.logit_bias, vocab_size),
            min_p=s.min_p,
            grammar=grammar,
            visual_kv_budget=cfg.visual_kv_budget if s.visual_kv_budget is None else s.visual_kv_budget,
        )
    except ValueError as exc:
        raise APIError(400, str(exc), None) from None


def seeded(params: SamplingParams, seed: int | None, index: int) -> SamplingParams:
    """Choice i of a seeded request samples with seed + i: reproducible, and the choices differ."""
    if seed is None or index == 0:
        return params
    return replace(params, seed=(seed + index) % 2**63)
