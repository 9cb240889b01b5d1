"""The OpenAI HTTP routes as a thin adapter over the service layer (`serving/api/`): read the
request (content type, size, JSON, the OpenAI schema), turn it into a `GenerateRequest`, and render
what the service produces as OpenAI JSON or SSE. Independent of Ray Serve, which only hosts it
(`serve.py`)."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from serving.api.errors import APIError, internal_error
from serving.api.run import Generation, failed_stage
from serving.api.service import GenerationService
from serving.api.tools import CallStream
from serving.config import GatewayConfig
from serving.control.client import ControlClient
from serving.gateway.admin import AdminAPI
from serving.gateway.bodies import chat_request, completion_request
from serving.gateway.errors import error_body, error_response
from serving.gateway.jsonbody import parse_body
from serving.gateway.render import Chunks, call_chunks, final_body, sse
from serving.gateway.schemas import ChatCompletionRequest, CompletionRequest
from serving.types import FinishReason

_TYPE_WORDS = re.compile(r"[A-Z]|[\[\]-]")  # pydantic's union-member labels in error locations


def _param(loc: tuple[Any, ...]) -> str | None:
    """A pydantic error location as the OpenAI `param`: field names and indexes, without the type
    labels pydantic adds for union members (class names stay inside)."""
    parts: list[str] = []
    for item in loc:
        part = str(item)
        if isinstance(item, str) and (_TYPE_WORDS.search(part) or part in ("str", "int", "float", "bool")):
            continue
        if not parts or parts[-1] != part:  # a discriminated union repeats its tag ("text.text")
            parts.append(part)
    return ".".join(parts) or None


def _validation_message(error: dict[str, Any]) -> str:
    message = str(error.get("msg", "invalid value"))
    if "instance of" in message or error.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        message = "Input should be a JSON object"
    return message[:300]


class GatewayService:
    def __init__(
        self,
        cfg: GatewayConfig,
        model_dir: str,
        model_id: str,
        plane: ControlClient,
        max_model_len: int,
    ) -> None:
        self.core = GenerationService(cfg, model_dir, model_id, plane, max_model_len)
        self.cfg, self.model_id, self.plane, self.max_model_len = cfg, model_id, plane, max_model_len
        self.admin = AdminAPI(plane)
        self.created = int(time.time())

    # The service's parts, for the host and the tests.
    pipeline = property(lambda self: self.core.pipeline)
    media = property(lambda self: self.core.media)
    metrics = property(lambda self: self.core.metrics)
    admission = property(lambda self: self.core.admission)
    inputs = property(lambda self: self.core.inputs)

    # -- routes -----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        with self.core.errors_counted():
            self.core.authorize(request.headers.get("authorization"))
            body = await self._parse(request, ChatCompletionRequest)
            typed = chat_request(body)
            generation = await self.core.generate(typed, arrival, "chatcmpl")
            parse_calls = bool(typed.tools) and typed.tool_choice.mode != "none"
            return await self._respond("chat", body, generation, parse_calls)

    async def completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        with self.core.errors_counted():
            self.core.authorize(request.headers.get("authorization"))
            body = await self._parse(request, CompletionRequest)
            generation = await self.core.generate(completion_request(body), arrival, "cmpl")
            return await self._respond("text", body, generation)

    async def models(self, request: Request) -> Response:
        self.core.authorize(request.headers.get("authorization"))
        model = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "epd-serve",
            "max_model_len": self.max_model_len,
        }
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self) -> Response:
        """Ready while every role (E, P, D) has a worker routed for it; 503 naming the missing ones."""
        if self.core.shutting_down:
            return error_response(APIError(503, "The server is shutting down.", code="shutting_down"))
        missing = [role.name.lower() for role, ok in self.core.roles_ready().items() if not ok]
        if missing:
            message = f"No active worker for: {', '.join(missing)}."
            exc = APIError(503, message, code="not_ready", headers={"Retry-After": "5"})
            return error_response(exc)
        entries = self.plane.directory.entries()
        return JSONResponse({"status": "ready", "model": self.model_id, "workers": len(entries)})

    async def metrics_text(self, request: Request) -> Response:
        if self.cfg.metrics_require_key:
            self.core.authorize(request.headers.get("authorization"))
        return Response(await self.core.scrape(), media_type=CONTENT_TYPE_LATEST)

    def authorize_admin(self, request: Request) -> None:
        """The admin API needs a key whenever keys are configured."""
        self.core.authorize(request.headers.get("authorization"))

    async def begin_shutdown(self) -> Response:
        """Stop admitting (503 + Retry-After) and wait for in-flight requests, up to the grace."""
        still_running = await self.core.begin_shutdown()
        return JSONResponse({"draining": True, "still_running": still_running})

    # -- reading the request ----------------------------------------------------------------------

    async def _parse(self, request: Request, schema: type[BaseModel]) -> Any:
        # Only JSON: a browser can post text/plain or a form to a loopback server without a preflight,
        # and a body with no type (a bare fetch of a Blob) too; refusing them keeps web pages out.
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, "The request body must be JSON (Content-Type: application/json).",
                           code="unsupported_media_type")  # fmt: skip
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise APIError(413, "The request body is too large.", code="body_too_large")
        # Read with the limit applied as it arrives: a chunked body declares no length, and read whole
        # first it could be any size in this process's memory before the check.
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.cfg.max_body_bytes:
                raise APIError(413, "The request body is too large.", code="body_too_large")
        data = parse_body(bytes(raw))  # 400 for bad JSON, deep nesting, lone surrogates, NaN
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            body = schema.model_validate(data)
        except ValidationError as exc:
            # The deepest error: for a union (a string or a list of parts) it names the failing part.
            first = max(exc.errors(), key=lambda e: len(e["loc"]))
            param = _param(first["loc"])
            message = f"Invalid value for '{param}': {_validation_message(first)}."
            raise APIError(400, message, param, "invalid_value") from None
        if refused := body.refusal():
            raise APIError(400, refused[1], refused[0], "unsupported_parameter")
        return body

    # -- answering --------------------------------------------------------------------------------

    async def _respond(
        self, kind: str, body: Any, generation: Generation, parse_calls: bool = False
    ) -> Response:
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream_events(kind, generation, include_usage, parse_calls),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": generation.request_id},
            )
        try:
            async for _ in generation.events():
                pass
        finally:
            await generation.close()
        if failed := generation.failed:
            raise APIError(
                500,
                f"The request failed: {failed.error or 'internal error'}.",
                code="stage_failed",
                stage=failed.failed_stage,
            )
        usage = self.core.usage(generation.choices)
        tokenizer = self.inputs.tokenizer
        return JSONResponse(
            final_body(
                kind,
                generation.request_id,
                self.model_id,
                generation.choices,
                usage,
                tokenizer.decode,
                tokenizer.token_bytes,
                parse_calls,
            )
        )

    async def _stream_events(
        self, kind: str, generation: Generation, include_usage: bool, parse_calls: bool = False
    ) -> AsyncIterator[str]:
        chunks = Chunks(kind, generation.request_id, self.model_id, include_usage)
        calls = {c.index: CallStream() for c in generation.choices} if parse_calls else {}
        try:
            if kind == "chat":
                for c in generation.choices:
                    yield chunks.chunk(c.index, None, None, role=True)
            async for choice, delta in generation.events():
                if delta.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                    if delta.finish_reason == FinishReason.ERROR:
                        self.metrics.observe_error("stage_failed", failed_stage(delta))
                    message = f"The request failed: {delta.error or 'aborted'}."
                    yield sse(error_body(APIError(500, message, code="stage_failed")))
                    break
                if parse_calls:
                    stream = calls[choice.index]
                    if events := call_chunks(chunks, stream, choice.index, delta.text, delta.finish_reason):
                        yield events
                    continue
                finished = str(delta.finish_reason) if delta.finish_reason else None
                if delta.text or finished:
                    yield chunks.chunk(choice.index, delta.text, finished)
            else:
                if include_usage:
                    yield chunks.usage(self.core.usage(generation.choices))
        except APIError as exc:  # a timeout, or no worker for a later choice: after the stream began
            self.metrics.observe_error(exc.error_type, exc.stage)
            yield sse(error_body(exc))
        except Exception:  # noqa: BLE001 - after the stream began an error can only be an event
            self.metrics.observe_error("internal", "gateway")
            yield sse(error_body(internal_error()))
        finally:
            await generation.close()
        yield "data: [DONE]\n\n"
