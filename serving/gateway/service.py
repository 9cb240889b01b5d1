"""What the HTTP routes do: authenticate, parse and validate, fetch images, tokenize, admit, run the
request's choices through the pipeline, and answer in OpenAI's format (JSON or SSE). Independent of
Ray Serve, which only hosts it (`serve.py`)."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from serving.config import GatewayConfig
from serving.control.plane import ControlPlane
from serving.engine.inputs import InputProcessor
from serving.gateway.admin import AdminAPI
from serving.gateway.admission import Admission, Ticket
from serving.gateway.errors import APIError, internal_error
from serving.gateway.jsonbody import parse_body
from serving.gateway.media import MediaFetcher
from serving.gateway.schemas import ChatCompletionRequest, CompletionRequest, ImagePart
from serving.pipeline import Request as PipelineRequest
from serving.telemetry.control_metrics import ControlCollector
from serving.telemetry.metrics import Metrics, WorkerCollector
from serving.types import (
    FinishReason,
    NoWorkerAvailable,
    PromptSpec,
    SamplingParams,
    StageTimings,
    TokenDelta,
)


def _counts_errors(route: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Count every error a route answers with in `epd:request_errors_total` (type, stage)."""

    @functools.wraps(route)
    async def counted(self: GatewayService, request: Request) -> Response:
        try:
            return await route(self, request)
        except APIError as exc:
            self.metrics.observe_error(exc.error_type, exc.stage)
            raise
        except Exception:
            self.metrics.observe_error("internal", "gateway")
            raise

    return counted


def _failed_stage(delta: TokenDelta) -> str:
    """Which stage failed a request, from the delta (its `stage` if it has one, else its message)."""
    stage = getattr(delta, "stage", None)
    if stage is None and (found := re.search(r"\b(encode|prefill|decode)\b", delta.error or "")):
        stage = found.group(1)
    return str(stage or "gateway")


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


@dataclass
class Choice:
    """One choice of a request as it runs: its own pipeline request and what it produced."""

    index: int
    spec: PromptSpec
    params: SamplingParams
    images: list = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    timings: StageTimings = field(default_factory=StageTimings)
    failed_stage: str = "gateway"  # for the error metrics, when finish_reason is ERROR


class GatewayService:
    def __init__(
        self,
        cfg: GatewayConfig,
        model_dir: str,
        model_id: str,
        plane: ControlPlane,
        max_model_len: int,
    ) -> None:
        self.cfg, self.model_id, self.plane = cfg, model_id, plane
        self.pipeline = plane.pipeline
        self.admin = AdminAPI(plane)
        self.shutting_down = False
        self.max_model_len = max_model_len
        self.inputs = InputProcessor.from_dir(model_dir)
        self.media = MediaFetcher(cfg)
        self.admission = Admission(
            cfg.max_concurrent_requests, cfg.max_queued_requests, cfg.max_image_pixels_in_flight
        )
        self.metrics = Metrics(model_id, cfg.slo_ttft_s, cfg.slo_tpot_s)
        self.worker_stats = WorkerCollector(model_id)
        self.metrics.registry.register(self.worker_stats)
        self.metrics.registry.register(ControlCollector(model_id, plane))
        self.created = int(time.time())

    # -- routes -----------------------------------------------------------------------------------

    @_counts_errors
    async def chat_completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        self._authorize(request)
        body = await self._parse(request, ChatCompletionRequest)
        self._check_model(body.model)
        self._check_sequences(1, body.n, "n")
        messages, urls = self._chat_messages(body)
        # Admitted before any image is fetched or decoded: the request's images are charged to it.
        ticket = await self.admission.acquire(body.n)
        queue_s = time.perf_counter() - arrival
        try:
            images = await self.media.load_all(urls, ticket)
            spec, images = await self._chat_spec(messages, images)
            self._check_tokens(len(spec.token_ids) * body.n, "messages")
            max_tokens = body.max_completion_tokens or body.max_tokens
            logprobs = body.top_logprobs or 0 if body.logprobs else None
            params = self._sampling(body, len(spec.token_ids), max_tokens, logprobs=logprobs)
            choices = [Choice(i, spec, self._seeded(params, body.seed, i), images) for i in range(body.n)]
        except BaseException:
            ticket.release()
            raise
        return await self._respond("chat", body, choices, arrival, ticket, queue_s)

    @_counts_errors
    async def completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        self._authorize(request)
        body = await self._parse(request, CompletionRequest)
        self._check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of non-empty strings.", "prompt")
        self._check_sequences(len(prompts), body.n, "prompt" if len(prompts) > 1 else "n")
        # Client text: special-token text in a prompt is plain text, never a control token or image pad.
        specs = [await asyncio.to_thread(self.inputs.spec_from_text, prompt) for prompt in prompts]
        self._check_tokens(sum(len(s.token_ids) for s in specs) * body.n, "prompt")
        choices = []
        for p, spec in enumerate(specs):
            params = self._sampling(body, len(spec.token_ids), body.max_tokens, logprobs=body.logprobs)
            choices += [
                Choice(p * body.n + i, spec, self._seeded(params, body.seed, i)) for i in range(body.n)
            ]
        return await self._respond("text", body, choices, arrival)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
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
        if self.shutting_down:
            return APIError(503, "The server is shutting down.", code="shutting_down").response()
        missing = [role.name.lower() for role, ok in self.plane.ready().items() if not ok]
        if missing:
            message = f"No active worker for: {', '.join(missing)}."
            return APIError(503, message, code="not_ready", headers={"Retry-After": "5"}).response()
        entries = self.plane.directory.entries()
        return JSONResponse({"status": "ready", "model": self.model_id, "workers": len(entries)})

    async def metrics_text(self, request: Request) -> Response:
        if self.cfg.metrics_require_key:
            self._authorize(request)
        # Each worker's stats are read with its own timeout: a dead one keeps its last values and
        # cannot freeze the others' gauges (the health monitor deals with it).
        await self.plane.call(self.plane.refresh_stats())
        entries = self.plane.directory.entries()
        self.worker_stats.stats = {e.name: e.stats for e in entries if e.stats is not None}
        self.metrics.running.labels(self.model_id).set(self.admission.running)
        self.metrics.waiting.labels(self.model_id).set(self.admission.waiting)
        self.metrics.sequences_running.labels(self.model_id).set(self.admission.sequences)
        self.metrics.image_pixels.labels(self.model_id).set(self.admission.pixels)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def authorize_admin(self, request: Request) -> None:
        """The admin API needs a key whenever keys are configured."""
        self._authorize(request)

    async def begin_shutdown(self) -> Response:
        """Stop admitting new requests (503 + Retry-After) and wait for the running ones to finish,
        up to the configured grace; answers how many were still running at the end."""
        self.shutting_down = True
        self.admission.close()
        deadline = time.monotonic() + self.cfg.shutdown_grace_s
        while (self.admission.running or self.admission.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return JSONResponse({"draining": True, "still_running": self.admission.running})

    # -- request checks ---------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if not self.cfg.api_keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        # Compare against every key so the time taken does not say which prefix matched.
        ok = False
        for key in self.cfg.api_keys:
            ok |= hmac.compare_digest(given.encode(), key.encode())
        if not ok:
            raise APIError(401, "Missing or invalid API key.", code="invalid_api_key")

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
        raw = await request.body()
        if len(raw) > self.cfg.max_body_bytes:
            raise APIError(413, "The request body is too large.", code="body_too_large")
        data = parse_body(raw)  # 400 for bad JSON, deep nesting, lone surrogates, NaN
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

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"The model '{name[:100]}' does not exist.", "model", "model_not_found")

    def _check_sequences(self, prompts: int, n: int, param: str) -> None:
        """A request runs prompts × n sequences: refused above the per-request budget (before any work)."""
        if prompts * n > self.cfg.max_sequences_per_request:
            raise APIError(
                400,
                f"This request asks for {prompts * n} sequences (prompts × n); the server accepts at most "
                f"{self.cfg.max_sequences_per_request} per request.",
                param,
                "too_many_sequences",
            )

    def _check_tokens(self, tokens: int, param: str) -> None:
        """Prompt tokens (image tokens included) × n: refused above the per-request budget."""
        if tokens > self.cfg.max_request_tokens:
            raise APIError(
                400,
                f"This request's prompts come to {tokens} tokens across its sequences (image tokens "
                f"included); the server accepts at most {self.cfg.max_request_tokens} per request.",
                param,
                "request_too_large",
            )

    def _chat_messages(
        self, body: ChatCompletionRequest
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Messages in chat-template form, and the image URLs (counted here, before any is fetched)."""
        messages: list[dict[str, Any]] = []
        urls: list[tuple[str, str]] = []
        for i, message in enumerate(body.messages):
            role = "system" if message.role == "developer" else message.role
            if not isinstance(message.content, list):
                messages.append({"role": role, "content": message.content or ""})
                continue
            parts = []
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    urls.append((part.image_url.url, f"messages.{i}.content.{j}.image_url"))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part.text})
            messages.append({"role": role, "content": parts})
        if len(urls) > self.cfg.max_images_per_request:
            raise APIError(
                400,
                f"At most {self.cfg.max_images_per_request} images per request.",
                "messages",
                "too_many_images",
            )
        return messages, urls

    async def _chat_spec(self, messages: list[dict[str, Any]], images: list) -> tuple[PromptSpec, list]:
        try:
            return await asyncio.to_thread(self.inputs.spec_from_messages, messages, images)
        except ValueError:
            raise APIError(400, "The messages could not be turned into a prompt.", "messages") from None

    def _sampling(
        self, body: Any, prompt_len: int, max_tokens: int | None, logprobs: int | None
    ) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = min(self.cfg.default_max_tokens, room)
        if room < 1 or max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                f"has {prompt_len} and {max_tokens} more were asked for.",
                "max_tokens",
                "context_length_exceeded",
            )
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 16 or any(not s for s in stop):
            raise APIError(400, "stop must be up to 16 non-empty strings.", "stop")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=body.top_p or 1.0,
                top_k=max(body.top_k or 0, 0),
                seed=body.seed,
                stop=stop,
                ignore_eos=body.ignore_eos,
                min_tokens=body.min_tokens,
                logprobs=logprobs,
            )
        except ValueError as exc:
            raise APIError(400, str(exc), None) from None

    @staticmethod
    def _seeded(params: SamplingParams, seed: int | None, index: int) -> SamplingParams:
        """Choice i of a seeded request samples with seed + i: reproducible, and the choices differ."""
        if seed is None or index == 0:
            return params
        return replace(params, seed=(seed + index) % 2**63)

    # -- running ----------------------------------------------------------------------------------

    async def _respond(
        self,
        kind: str,
        body: Any,
        choices: list[Choice],
        arrival: float,
        ticket: Ticket | None = None,
        queue_s: float | None = None,
    ) -> Response:
        """Run the choices under an admission ticket (acquired here unless the caller holds one)."""
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        if ticket is None:
            ticket = await self.admission.acquire(len(choices))
            queue_s = time.perf_counter() - arrival
        queue_s = queue_s or 0.0
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            # The first event decides the status: with no worker able to serve, a 503 rather than
            # a 200 stream that only carries an error.
            runs = await self._primed(self._run(request_id, choices, arrival, queue_s), ticket)
            events = self._stream_events(
                kind, request_id, body, choices, arrival, queue_s, include_usage, ticket, runs
            )
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Request-Id": request_id},
            )
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                async for _ in self._run(request_id, choices, arrival, queue_s):
                    pass
        except TimeoutError:
            raise APIError(504, "The request timed out.", code="timeout") from None
        except NoWorkerAvailable as exc:
            raise _unavailable(exc) from None
        finally:
            ticket.release()
        if failed := next((c for c in choices if c.finish_reason == FinishReason.ERROR), None):
            raise APIError(
                500,
                f"The request failed: {failed.error or 'internal error'}.",
                code="stage_failed",
                stage=failed.failed_stage,
            )
        return JSONResponse(self._final_body(kind, request_id, body, choices))

    async def _primed(
        self, runs: AsyncIterator[tuple[Choice, TokenDelta]], ticket: Ticket
    ) -> AsyncIterator[tuple[Choice, TokenDelta]]:
        """`runs` with its first event already awaited: NoWorkerAvailable there is a 503."""
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                first = await anext(runs, None)
        except BaseException as exc:
            await runs.aclose()  # type: ignore[attr-defined]
            ticket.release()
            if isinstance(exc, NoWorkerAvailable):
                raise _unavailable(exc) from None
            if isinstance(exc, TimeoutError):
                raise APIError(504, "The request timed out.", code="timeout") from None
            raise

        async def chained() -> AsyncIterator[tuple[Choice, TokenDelta]]:
            try:
                if first is not None:
                    yield first
                async for item in runs:
                    yield item
            finally:
                await runs.aclose()  # type: ignore[attr-defined]

        return chained()

    async def _run(
        self, request_id: str, choices: list[Choice], arrival: float, queue_s: float
    ) -> AsyncIterator[tuple[Choice, TokenDelta]]:
        """Every choice's deltas as they come; cancelling the consumer cancels every choice's pipeline."""
        events: asyncio.Queue = asyncio.Queue()
        done = object()

        async def run_choice(choice: Choice) -> None:
            request = PipelineRequest(
                f"{request_id}-{choice.index}",
                choice.spec,
                choice.params,
                choice.images,
                arrival=arrival,
                deadline_s=self.cfg.request_timeout_s,
            )
            try:
                async for delta in self.pipeline.run(request):
                    await events.put((choice, delta))
            except NoWorkerAvailable as exc:
                await events.put(exc)  # re-raised by the consumer: a 503, not an empty answer
            finally:
                await events.put(done)

        tasks = [asyncio.create_task(run_choice(c)) for c in choices]
        try:
            remaining = len(tasks)
            while remaining:
                item = await events.get()
                if item is done:
                    remaining -= 1
                    continue
                if isinstance(item, NoWorkerAvailable):
                    raise item
                choice, delta = item
                self._record(choice, delta, arrival, queue_s)
                yield choice, delta
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Choices the gateway stopped (client gone, timeout) end as aborts, in the metrics too.
            for choice in choices:
                if choice.finish_reason is None:
                    abort = TokenDelta(f"{request_id}-{choice.index}", [], "", FinishReason.ABORT)
                    self._record(choice, abort, arrival, queue_s)

    def _record(self, choice: Choice, delta: TokenDelta, arrival: float, queue_s: float) -> None:
        now = time.perf_counter()
        if delta.token_ids:
            choice.first_token_at = choice.first_token_at or now
            choice.token_times.extend([now] * len(delta.token_ids))
        choice.token_ids.extend(delta.token_ids)
        choice.text.append(delta.text)
        choice.logprobs.extend(delta.logprobs or [])
        if delta.finished:
            timings = delta.timings or StageTimings()
            choice.finish_reason, choice.error, choice.timings = delta.finish_reason, delta.error, timings
            if delta.finish_reason == FinishReason.ERROR:
                choice.failed_stage = _failed_stage(delta)
            self.metrics.observe_request(
                arrival=arrival,
                first_token=choice.first_token_at,
                end=now,
                token_times=choice.token_times,
                prompt_tokens=len(choice.spec.token_ids),
                output_tokens=len(choice.token_ids),
                finish_reason=str(delta.finish_reason),
                timings=timings,
                queue_s=queue_s,
            )

    # -- answers ----------------------------------------------------------------------------------

    def _usage(self, choices: list[Choice]) -> dict[str, Any]:
        prompts = {id(c.spec): c.spec for c in choices}.values()
        prompt_tokens = sum(len(s.token_ids) for s in prompts)
        image_tokens = sum(self.inputs.model_config.num_image_tokens(g) for s in prompts for g in s.grids)
        completion = sum(len(c.token_ids) for c in choices)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "image_tokens": image_tokens},
        }

    def _logprobs(self, kind: str, entries: list[dict[int, float]]) -> dict[str, Any] | None:
        if not entries:
            return None
        decode = self.inputs.tokenizer.decode

        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = decode([token_id], skip_special_tokens=False)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        if kind == "chat":
            content = []
            for entry in entries:
                (token_id, logprob), *_ = entry.items()
                content.append(
                    item(token_id, logprob)
                    | {"top_logprobs": [item(t, lp) for t, lp in list(entry.items())[1:]]}
                )
            return {"content": content}
        tokens = [decode([next(iter(e))], skip_special_tokens=False) for e in entries]
        return {
            "tokens": tokens,
            "token_logprobs": [next(iter(e.values())) for e in entries],
            "top_logprobs": [
                {decode([t], skip_special_tokens=False): lp for t, lp in list(e.items())[1:]} for e in entries
            ],
        }

    def _final_body(self, kind: str, request_id: str, body: Any, choices: list[Choice]) -> dict[str, Any]:
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            text = "".join(c.text)
            entry: dict[str, Any] = {
                "index": c.index,
                "finish_reason": str(c.finish_reason),
                "logprobs": self._logprobs(kind, c.logprobs),
            }
            if kind == "chat":
                entry["message"] = {"role": "assistant", "content": text}
            else:
                entry["text"] = text
            out.append(entry)
        return {
            "id": request_id,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": out,
            "usage": self._usage(choices),
        }

    async def _stream_events(
        self,
        kind: str,
        request_id: str,
        body: Any,
        choices: list[Choice],
        arrival: float,
        queue_s: float,
        include_usage: bool,
        ticket: Ticket,
        runs: AsyncIterator[tuple[Choice, TokenDelta]] | None = None,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(index: int, content: str | None, finish: str | None, role: bool = False) -> str:
            if kind == "chat":
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if content:
                    delta["content"] = content
                choice: dict[str, Any] = {
                    "index": index,
                    "delta": delta,
                    "finish_reason": finish,
                    "logprobs": None,
                }
            else:
                choice = {"index": index, "text": content or "", "finish_reason": finish, "logprobs": None}
            payload: dict[str, Any] = {
                "id": request_id,
                "object": obj,
                "created": created,
                "model": self.model_id,
                "choices": [choice],
            }
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if kind == "chat":
                for c in choices:
                    yield chunk(c.index, None, None, role=True)
            async with asyncio.timeout(self.cfg.request_timeout_s):
                async for choice, delta in runs or self._run(request_id, choices, arrival, queue_s):
                    if delta.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                        if delta.finish_reason == FinishReason.ERROR:
                            self.metrics.observe_error("stage_failed", _failed_stage(delta))
                        message = f"The request failed: {delta.error or 'aborted'}."
                        yield f"data: {json.dumps(APIError(500, message, code='stage_failed').body())}\n\n"
                        break
                    finished = str(delta.finish_reason) if delta.finish_reason else None
                    if delta.text or finished:
                        yield chunk(choice.index, delta.text, finished)
                else:
                    if include_usage:
                        usage = {
                            "id": request_id,
                            "object": obj,
                            "created": created,
                            "model": self.model_id,
                            "choices": [],
                            "usage": self._usage(choices),
                        }
                        yield f"data: {json.dumps(usage)}\n\n"
        except TimeoutError:
            self.metrics.observe_error("timeout", "gateway")
            yield f"data: {json.dumps(APIError(504, 'The request timed out.', code='timeout').body())}\n\n"
        except Exception:  # noqa: BLE001 - after the stream began an error can only be an event
            self.metrics.observe_error("internal", "gateway")
            yield f"data: {json.dumps(internal_error().body())}\n\n"
        finally:
            ticket.release()
        yield "data: [DONE]\n\n"


def _unavailable(exc: NoWorkerAvailable) -> APIError:
    """No worker could take a stage in time: 503, with when to retry."""
    message = f"The server has no {exc.stage.name.lower()} capacity right now; retry shortly."
    return APIError(503, message, code="no_worker_available", headers={"Retry-After": "5"})
