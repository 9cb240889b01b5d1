"""Protobuf messages ↔ the service layer's types. Protobuf gives the types; the service layer checks
the bounds. Fields this server does not know (a client built from a newer .proto) are refused by
number rather than ignored, as the OpenAI routes refuse unsupported parameters by name."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from serving.api import tools
from serving.api.errors import APIError, invalid_value
from serving.api.requests import (
    NO_ARGUMENTS,
    GenerateRequest,
    ImageInput,
    OutputFormat,
    OutputKind,
    Sampling,
    TextInput,
    Tool,
    ToolCall,
    ToolChoice,
    VideoInput,
)
from serving.api.requests import Message as ChatMessage
from serving.api.run import Choice, Usage
from serving.rpc.proto import generate_pb2 as pb
from serving.types import FinishReason, StageTimings, TokenDelta

_FINISH = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}
_TIMING_FIELDS = frozenset(pb.StageTimings.DESCRIPTOR.fields_by_name)


class Malformed:
    """What a request that does not parse as its message becomes (refused as INVALID_ARGUMENT)."""


def lenient(message: type[Message]) -> Any:
    """A request deserializer that turns undecodable bytes (invalid UTF-8 in a string field, a
    truncated message) into `Malformed` instead of an exception gRPC would answer as INTERNAL."""

    def parse(raw: bytes) -> Message | Malformed:
        try:
            return message.FromString(raw)
        except (DecodeError, ValueError, RuntimeError):
            return Malformed()

    return parse


def check_parsed(request: Any) -> None:
    if isinstance(request, Malformed):
        raise APIError(
            400, "The request is not a valid protobuf message of its type.", code="invalid_message"
        )
    if found := unknown_field(request):
        path, number = found
        where = f" in '{path}'" if path else ""
        raise APIError(
            400,
            f"The request carries field number {number}{where}, which this server does not support.",
            path or None,
            "unsupported_parameter",
        )


def unknown_field(message: Message, path: str = "") -> tuple[str, int] | None:
    """(path, field number) of the first field the server's .proto does not declare."""
    unknown = UnknownFieldSet(message)
    if len(unknown):
        return path, unknown[0].field_number
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        items = list(value) if field.is_repeated else [value]
        for i, item in enumerate(items):
            sub = f"{path}{field.name}" + (f".{i}" if field.is_repeated else "")
            if found := unknown_field(item, sub + "."):
                return found[0].rstrip("."), found[1]
    return None


def generate_request(request: pb.GenerateRequest | pb.TokenizeRequest) -> GenerateRequest:
    """A Generate (or Tokenize) request as the service layer's request."""
    check_parsed(request)
    messages = tuple(_message(i, m) for i, m in enumerate(request.messages))
    if request.prompt and messages:
        raise invalid_value("prompt", "give messages or a prompt, not both")
    prompts = (request.prompt,) if request.prompt else None
    if not isinstance(request, pb.GenerateRequest):
        return GenerateRequest(request.model, messages=messages, prompts=prompts)
    s = request.sampling

    def opt(name: str) -> Any:
        return getattr(s, name) if s.HasField(name) else None

    sampling = Sampling(
        max_tokens=opt("max_tokens"),
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        seed=opt("seed"),
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
        min_tokens=s.min_tokens,
        logprobs=opt("logprobs"),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=1.0 if opt("repetition_penalty") is None else s.repetition_penalty,
        logit_bias=tuple((str(token), bias) for token, bias in sorted(s.logit_bias.items())),
        min_p=s.min_p,
        visual_kv_budget=opt("visual_kv_budget"),
    )
    n = request.n if request.HasField("n") else 1
    offered = tuple(_tool(i, t) for i, t in enumerate(request.tools))
    return GenerateRequest(
        request.model,
        messages=messages,
        prompts=prompts,
        sampling=sampling,
        n=n,
        output=_output(request.output) if request.HasField("output") else None,
        tools=offered,
        tool_choice=_tool_choice(request, offered),
        parallel_tool_calls=request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True,
        video_fps=request.video_fps if request.HasField("video_fps") else None,
        video_num_frames=request.video_num_frames if request.HasField("video_num_frames") else None,
        image_pruning_rate=request.image_pruning_rate if request.HasField("image_pruning_rate") else None,
        video_pruning_rate=request.video_pruning_rate if request.HasField("video_pruning_rate") else None,
        min_pixels=request.min_pixels if request.HasField("min_pixels") else None,
        max_pixels=request.max_pixels if request.HasField("max_pixels") else None,
    )


def _json(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise invalid_value(param, "must be JSON text") from None


def _output(output: pb.OutputFormat) -> OutputFormat:
    kind = output.WhichOneof("format")
    param = f"output.{kind}"
    if kind == "json_schema":
        schema = _json(output.json_schema, param)
        if not isinstance(schema, dict):
            raise invalid_value(param, "must be a JSON schema object")
        return OutputFormat(OutputKind.JSON_SCHEMA, schema, param)
    if kind == "json_object" and output.json_object:
        return OutputFormat(OutputKind.JSON_OBJECT, None, param)
    if kind == "regex":
        return OutputFormat(OutputKind.REGEX, output.regex, param)
    if kind == "choice" and len(output.choice.choices):
        return OutputFormat(OutputKind.CHOICE, tuple(output.choice.choices), param)
    if kind == "grammar":
        return OutputFormat(OutputKind.GRAMMAR, output.grammar, param)
    raise invalid_value("output", "set one of json_schema, json_object, regex, choice (non-empty), grammar")


def _tool(i: int, tool: pb.Tool) -> Tool:
    parameters = dict(NO_ARGUMENTS)
    if tool.parameters:
        parameters = _json(tool.parameters, f"tools.{i}.parameters")
    return Tool(tool.name, parameters, tool.description or None)


def _tool_choice(request: pb.GenerateRequest, offered: tuple[Tool, ...]) -> ToolChoice:
    kind = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if kind == "function":
        return ToolChoice("function", request.tool_choice.function)
    if kind == "mode":
        return ToolChoice(request.tool_choice.mode)
    return ToolChoice("auto" if offered else "none")


def _message(i: int, message: pb.Message) -> ChatMessage:
    if message.text and len(message.parts):
        raise invalid_value(f"messages.{i}", "give text or parts, not both")
    calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in message.tool_calls)
    call_id = message.tool_call_id or None
    if not len(message.parts):
        return ChatMessage(message.role, message.text, calls, call_id)
    parts: list[TextInput | ImageInput | VideoInput] = []
    for j, part in enumerate(message.parts):
        param = f"messages.{i}.parts.{j}"
        kind = part.WhichOneof("part")
        if kind == "text":
            parts.append(TextInput(part.text))
        elif kind in ("image", "video"):
            parts.append(_media(kind, getattr(part, kind), f"{param}.{kind}"))
        else:
            raise invalid_value(param, "a part needs text or an image")
    return ChatMessage(message.role, tuple(parts), calls, call_id)


def _media(kind: str, media: pb.Image | pb.Video, param: str) -> ImageInput | VideoInput:
    make: Callable[..., ImageInput | VideoInput] = VideoInput
    if isinstance(media, pb.Image):
        if media.detail not in ("", "auto", "low", "high"):
            raise invalid_value(f"{param}.detail", "must be low, high or auto")
        make = functools.partial(ImageInput, detail=media.detail or None)
    uuid = media.uuid or None
    source = media.WhichOneof("source")
    if source == "data":
        return make(data=media.data, param=f"{param}.data", uuid=uuid)
    if source == "url":
        return make(url=media.url, param=f"{param}.url", uuid=uuid)
    if uuid is None:
        raise invalid_value(
            param, f"{'an image' if kind == 'image' else 'a video'} needs data, a url or a uuid"
        )
    return make(param=param, uuid=uuid)


def generate_response(
    request_id: str, choice: Choice, delta: TokenDelta, usage: Usage | None = None, parse_calls: bool = False
) -> pb.GenerateResponse:
    """One streamed message. With `parse_calls` (the request offered tools), a choice's last message
    carries the calls read out of its whole text (which streamed as it was generated)."""
    out = pb.GenerateResponse(
        request_id=request_id, index=choice.index, token_ids=delta.token_ids, text=delta.text
    )
    k = choice.params.logprobs or 0
    for entry in delta.logprobs or []:
        # The engine's entry is the chosen token, then the k most likely ones (a dict: the chosen one
        # appears once even when it is among them), so the k best of the entry are the top k.
        (token_id, logprob), *_ = entry.items()
        best = sorted(entry.items(), key=lambda item: -item[1])[:k]
        top = [pb.TopLogprob(token_id=t, logprob=lp) for t, lp in best]
        out.logprobs.append(pb.TokenLogprob(token_id=token_id, logprob=logprob, top=top))
    if delta.finish_reason is not None:
        out.finish_reason = _FINISH.get(delta.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        calls = tools.parse("".join(choice.text))[1] if parse_calls else []
        for call in calls:
            out.tool_calls.append(pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments))
        if calls and delta.finish_reason == FinishReason.STOP:
            out.finish_reason = pb.FINISH_REASON_TOOL_CALLS
        out.timings.CopyFrom(stage_timings(delta.timings or choice.timings))
    if usage is not None:
        out.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                image_tokens=usage.image_tokens,
                video_tokens=usage.video_tokens,
                pruned_visual_tokens=usage.pruned_tokens,
            )
        )
    return out


def stage_timings(timings: StageTimings) -> pb.StageTimings:
    """The fields the .proto declares (a field added to `StageTimings` later is left out, not fatal)."""
    return pb.StageTimings(
        **{k: v for k, v in vars(timings).items() if v is not None and k in _TIMING_FIELDS}
    )
