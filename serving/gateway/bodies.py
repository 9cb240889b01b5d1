"""OpenAI request bodies (validated by `schemas.py`) turned into the typed `GenerateRequest` the
service layer runs: messages and their parts, sampling, the output format and the tools."""

from __future__ import annotations

import json
from typing import Any

from serving.api.errors import APIError
from serving.api.requests import (
    NO_ARGUMENTS,
    GenerateRequest,
    ImageInput,
    Message,
    OutputFormat,
    OutputKind,
    Sampling,
    TextInput,
    Tool,
    ToolCall,
    ToolChoice,
    VideoInput,
)
from serving.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ImagePart,
    SamplingFields,
    VideoPart,
)


def _stop(body: Any) -> tuple[str, ...]:
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())


def _sampling(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> Sampling:
    return Sampling(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=_stop(body),
        ignore_eos=body.ignore_eos,
        min_tokens=body.min_tokens,
        logprobs=logprobs,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=tuple((body.logit_bias or {}).items()),
        min_p=body.min_p or 0.0,
        visual_kv_budget=body.visual_kv_budget,
    )


def _json_spec(value: dict[str, Any] | str, param: str) -> OutputFormat:
    if isinstance(value, str):  # vLLM takes a schema as JSON text too
        try:
            value = json.loads(value)
        except ValueError:
            raise APIError(
                400, f"{param} must be a JSON schema (an object, or its JSON text).", param
            ) from None
        if not isinstance(value, dict):
            raise APIError(400, f"{param} must be a JSON schema object.", param)
    return OutputFormat(OutputKind.JSON_SCHEMA, value, param)


def output_format(body: SamplingFields) -> OutputFormat | None:
    """The one output constraint a request asks for (400 when it asks for several)."""
    found: list[OutputFormat] = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(OutputFormat(OutputKind.JSON_OBJECT, None, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema.", "response_format")
        found.append(_json_spec(rf.json_schema.json_schema, "response_format.json_schema.schema"))
    so = body.structured_outputs
    if so is not None:
        given = [
            (name, value)
            for name, value in (
                ("json", so.json_),
                ("regex", so.regex),
                ("choice", so.choice),
                ("grammar", so.grammar),
            )
            if value is not None
        ] + ([("json_object", True)] if so.json_object else [])
        if len(given) != 1:
            raise APIError(
                400,
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object.",
                "structured_outputs",
            )
        found.append(_legacy(*given[0], "structured_outputs"))
    for name in ("json", "regex", "choice", "grammar"):
        if (value := getattr(body, f"guided_{name}")) is not None:
            found.append(_legacy(name, value, f"guided_{name}"))
    if len(found) > 1:
        names = ", ".join(f.param.split(".")[0] for f in found)
        raise APIError(400, f"Give one output format, not several ({names}).", found[1].param.split(".")[0])
    return found[0] if found else None


def _legacy(name: str, value: Any, param: str) -> OutputFormat:
    where = param if param.startswith("guided_") else f"{param}.{name}"
    if name == "json":
        return _json_spec(value, where)
    if name == "json_object":
        return OutputFormat(OutputKind.JSON_OBJECT, None, where)
    if name == "choice":
        return OutputFormat(OutputKind.CHOICE, tuple(value), where)
    return OutputFormat(OutputKind.REGEX if name == "regex" else OutputKind.GRAMMAR, value, where)


def _content(message: Any, i: int) -> Any:
    content = message.content
    if not isinstance(content, list):
        return content
    parts = []
    for j, part in enumerate(content):
        if isinstance(part, ImagePart | VideoPart) and message.role == "tool":
            raise APIError(400, "Tool results are text.", f"messages.{i}.content.{j}")
        if isinstance(part, ImagePart):
            image = part.image_url
            parts.append(
                ImageInput(
                    url=(image.url if image else None) or "",
                    param=f"messages.{i}.content.{j}.image_url",
                    detail=image.detail if image else None,
                    uuid=part.uuid,
                )
            )
        elif isinstance(part, VideoPart):
            url = (part.video_url.url if part.video_url else None) or ""
            param = f"messages.{i}.content.{j}.video_url"
            parts.append(VideoInput(url=url, param=param, uuid=part.uuid))
        else:
            parts.append(TextInput(part.text))
    return tuple(parts)


def chat_request(body: ChatCompletionRequest) -> GenerateRequest:
    messages = []
    for i, message in enumerate(body.messages):
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ())
        if calls and message.role != "assistant":
            raise APIError(400, "Only assistant messages carry tool_calls.", f"messages.{i}.tool_calls")
        messages.append(Message(message.role, _content(message, i), calls, message.tool_call_id))
    tools = tuple(
        Tool(
            t.function.name,
            t.function.parameters if t.function.parameters is not None else dict(NO_ARGUMENTS),
            t.function.description,
            bool(t.function.strict),
        )
        for t in body.tools or ()
    )
    video = body.media_io_kwargs.video if body.media_io_kwargs else None
    budget = body.mm_processor_kwargs
    choice = body.tool_choice
    if choice is None:
        tool_choice = ToolChoice("auto" if tools else "none")
    elif isinstance(choice, str):
        tool_choice = ToolChoice(choice)
    else:
        tool_choice = ToolChoice("function", choice.function.name)
    return GenerateRequest(
        body.model,
        messages=tuple(messages),
        sampling=_sampling(
            body,
            body.max_completion_tokens or body.max_tokens,
            (body.top_logprobs or 0) if body.logprobs else None,
        ),
        n=body.n,
        output=output_format(body),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        video_fps=video.fps if video else None,
        video_num_frames=video.num_frames if video else None,
        min_pixels=budget.min_pixels if budget else None,
        max_pixels=budget.max_pixels if budget else None,
        image_pruning_rate=budget.image_pruning_rate if budget else None,
        video_pruning_rate=budget.video_pruning_rate if budget else None,
    )


def completion_request(body: CompletionRequest) -> GenerateRequest:
    prompts = (body.prompt,) if isinstance(body.prompt, str) else tuple(body.prompt)
    return GenerateRequest(
        body.model,
        prompts=prompts,
        sampling=_sampling(body, body.max_tokens, body.logprobs),
        n=body.n,
        output=output_format(body),
    )
