"""What the HTTP routes do: authenticate, parse and validate, fetch images, tokenize, admit, run the
request's choices through the pipeline, and answer in OpenAI's format (JSON or SSE). Independent of
Ray Serve, which only hosts it (`serve.py`)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from serving.config import GatewayConfig
from serving.engine.inputs import InputProcessor
from serving.gateway.admission import Admission
from serving.gateway.errors import APIError, internal_error
from serving.gateway.media import MediaFetcher
from serving.gateway.schemas import ChatCompletionRequest, CompletionRequest, ImagePart
from serving.pipeline import Pipeline
from serving.pipeline import Request as PipelineRequest
from serving.stages.handles import WorkerHandle
from serving.telemetry.metrics import Metrics, WorkerCollector
from serving.types import FinishReason, PromptSpec, SamplingParams, TokenDelta


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
    timings: dict[str, float] = field(default_factory=dict)


class GatewayService:
    def __init__(
        self,
        cfg: GatewayConfig,
        model_dir: str,
        model_id: str,
        pipeline: Pipeline,
        handles: list[WorkerHandle],
        max_model_len: int,
    ) -> None:
        self.cfg, self.model_id, self.pipeline, self.handles = cfg, model_id, pipeline, handles
        self.max_model_len = max_model_len
        self.inputs = InputProcessor.from_dir(model_dir)
        self.media = MediaFetcher(cfg)
        self.admission = Admission(cfg.max_concurrent_requests, cfg.max_queued_requests)
        self.metrics = Metrics(model_id, cfg.slo_ttft_s, cfg.slo_tpot_s)
        self.worker_stats = WorkerCollector(model_id)
        self.metrics.registry.register(self.worker_stats)
        self.created = int(time.time())

    # -- routes -----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        self._authorize(request)
        body = await self._parse(request, ChatCompletionRequest)
        self._check_model(body.model)
        spec, images = await self._chat_prompt(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self._sampling(
            body, len(spec.token_ids), max_tokens, logprobs=body.top_logprobs or 0 if body.logprobs else None
        )
        choices = [Choice(i, spec, self._seeded(params, body.seed, i), images) for i in range(body.n)]
        return await self._respond("chat", body, choices, arrival)

    async def completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        self._authorize(request)
        body = await self._parse(request, CompletionRequest)
        self._check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported.", "echo")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of non-empty strings.", "prompt")
        choices = []
        for p, prompt in enumerate(prompts):
            spec = PromptSpec(await asyncio.to_thread(self.inputs.tokenizer.encode, prompt))
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
        """Ready when every pool has a live worker (each answers its stats call)."""
        try:
            async with asyncio.timeout(10):
                await self._refresh_worker_stats()
        except Exception:  # noqa: BLE001 - any failure means not ready
            return APIError(503, "The model is not ready yet.", code="not_ready").response()
        pools = self.pipeline.pools
        if not all(pool.handles for pool in pools.values()):
            return APIError(503, "A worker pool is empty.", code="not_ready").response()
        return JSONResponse(
            {
                "status": "ready",
                "model": self.model_id,
                "topology": self.pipeline.topology,
                "workers": len(self.handles),
            }
        )

    async def metrics_text(self, request: Request) -> Response:
        if self.cfg.metrics_require_key:
            self._authorize(request)
        try:
            async with asyncio.timeout(5):
                await self._refresh_worker_stats()
        except Exception:  # noqa: BLE001 - serve the gateway's own metrics even if a worker is down
            pass
        self.metrics.running.labels(self.model_id).set(self.admission.running)
        self.metrics.waiting.labels(self.model_id).set(self.admission.waiting)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _refresh_worker_stats(self) -> None:
        values = await asyncio.gather(*(h.call("stats") for h in self.handles))
        self.worker_stats.stats = {h.name: v for h, v in zip(self.handles, values, strict=True)}

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
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise APIError(413, "The request body is too large.", code="body_too_large")
        raw = await request.body()
        if len(raw) > self.cfg.max_body_bytes:
            raise APIError(413, "The request body is too large.", code="body_too_large")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise APIError(400, f"Invalid value for '{param}': {first['msg']}.", param) from None

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"The model '{name[:100]}' does not exist.", "model", "model_not_found")

    async def _chat_prompt(self, body: ChatCompletionRequest) -> tuple[PromptSpec, list]:
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
        images = list(await asyncio.gather(*(self.media.load(url, param) for url, param in urls)))
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

    async def _respond(self, kind: str, body: Any, choices: list[Choice], arrival: float) -> Response:
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        await self.admission.acquire()
        queue_s = time.perf_counter() - arrival
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream_events(kind, request_id, body, choices, arrival, queue_s, include_usage)
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
        finally:
            self.admission.release()
        if failed := next((c for c in choices if c.finish_reason == FinishReason.ERROR), None):
            raise APIError(
                500, f"The request failed: {failed.error or 'internal error'}.", code="stage_failed"
            )
        return JSONResponse(self._final_body(kind, request_id, body, choices))

    async def _run(
        self, request_id: str, choices: list[Choice], arrival: float, queue_s: float
    ) -> AsyncIterator[tuple[Choice, TokenDelta]]:
        """Every choice's deltas as they come; cancelling the consumer cancels every choice's pipeline."""
        events: asyncio.Queue = asyncio.Queue()
        done = object()

        async def run_choice(choice: Choice) -> None:
            request = PipelineRequest(
                f"{request_id}-{choice.index}", choice.spec, choice.params, choice.images
            )
            try:
                async for delta in self.pipeline.run(request):
                    await events.put((choice, delta))
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
                choice, delta = item
                self._record(choice, delta, arrival, queue_s)
                yield choice, delta
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _record(self, choice: Choice, delta: TokenDelta, arrival: float, queue_s: float) -> None:
        now = time.perf_counter()
        if delta.token_ids:
            choice.first_token_at = choice.first_token_at or now
            choice.token_times.extend([now] * len(delta.token_ids))
        choice.token_ids.extend(delta.token_ids)
        choice.text.append(delta.text)
        choice.logprobs.extend(delta.logprobs or [])
        if delta.finished:
            choice.finish_reason, choice.error, choice.timings = delta.finish_reason, delta.error, delta.extra
            self.metrics.observe_request(
                arrival=arrival,
                first_token=choice.first_token_at,
                end=now,
                token_times=choice.token_times,
                prompt_tokens=len(choice.spec.token_ids),
                output_tokens=len(choice.token_ids),
                finish_reason=str(delta.finish_reason),
                timings=delta.extra,
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
                async for choice, delta in self._run(request_id, choices, arrival, queue_s):
                    if delta.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
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
            yield f"data: {json.dumps(APIError(504, 'The request timed out.', code='timeout').body())}\n\n"
        except Exception:  # noqa: BLE001 - after the stream began an error can only be an event
            yield f"data: {json.dumps(internal_error().body())}\n\n"
        finally:
            self.admission.release()
        yield "data: [DONE]\n\n"
