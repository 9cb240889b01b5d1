"""`GenerationService`: everything a request needs besides its transport. Both front ends call it:
authenticate, check, admit, fetch and probe media (the encode worker decodes them), tokenize, run
the choices (`Generation`), and account metrics and SLOs in one place."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
from jinja2.exceptions import TemplateError
from prometheus_client import CollectorRegistry, generate_latest

from serving.api.admission import Admission
from serving.api.budgets import PixelBudget, check_visual_tokens, detail_budget, fitted_size, request_budget
from serving.api.errors import APIError, invalid_value
from serving.api.grammars import GrammarChecker
from serving.api.media import MediaFetcher, MediaRef
from serving.api.prepare import (
    chat_messages,
    check_sequences,
    check_tokens,
    sampling_params,
    seeded,
)
from serving.api.requests import GenerateRequest, check_bounds
from serving.api.run import Choice, Generation, Usage
from serving.api.tools import template_tools
from serving.api.video import VideoSampling
from serving.config import GatewayConfig
from serving.control.client import ControlClient
from serving.engine.inputs import InputProcessor
from serving.stages.decode import decode_item
from serving.telemetry.control_metrics import ControlCollector, PipelineCollector
from serving.telemetry.controller_metrics import ControllerCollector
from serving.telemetry.metrics import Metrics, WorkerCollector
from serving.telemetry.replicas import merge_replicas
from serving.types import MediaItem, MediaRejected, PromptSpec, Role


def video_sampling(request: GenerateRequest) -> VideoSampling:
    return VideoSampling(request.video_fps, request.video_num_frames)


@dataclass(frozen=True)
class Tokenized:
    token_ids: list[int]
    image_tokens: int


@dataclass(frozen=True)
class SLOStatus:
    """The SLO targets and how the requests this gateway finished met them, since it started."""

    ttft_target_s: float
    tpot_target_s: float
    requests: int
    ttft_met: int
    tpot_met: int
    met: int
    window_s: float

    @property
    def attainment(self) -> float:
        return self.met / self.requests if self.requests else 0.0

    @property
    def goodput_rps(self) -> float:
        return self.met / self.window_s if self.window_s > 0 else 0.0


class GenerationService:
    def __init__(
        self,
        cfg: GatewayConfig,
        model_dir: str,
        model_id: str,
        plane: ControlClient,
        max_model_len: int,
    ) -> None:
        self.cfg, self.model_id, self.plane, self.max_model_len = cfg, model_id, plane, max_model_len
        self.pipeline = plane.pipeline
        self.inputs = InputProcessor.from_dir(model_dir)
        model = self.inputs.model_config
        self.vocab_size = model.text.vocab_size
        self.grammars = GrammarChecker(model_dir, self.vocab_size, model.eos_token_ids)
        self.media = MediaFetcher(cfg, on_reuse=lambda: self.metrics.media_uuid_hits.labels(model_id).inc())
        self.admission = Admission(
            cfg.max_concurrent_requests, cfg.max_queued_requests, cfg.max_image_pixels_in_flight
        )
        self.metrics = Metrics(model_id, cfg.slo_ttft_s, cfg.slo_tpot_s)
        self.metrics.registry.register(PipelineCollector(model_id, self.pipeline))
        # The deployment's series (workers, control plane, controller): the same whichever replica
        # answers a scrape, so never labelled by gateway.
        self.deployment = CollectorRegistry(auto_describe=False)
        self.worker_stats = WorkerCollector(model_id)
        self.deployment.register(self.worker_stats)
        self.deployment.register(ControlCollector(model_id, plane))
        self.deployment.register(ControllerCollector(model_id, lambda: plane.report.controller))
        self.metrics.window = plane.window
        plane.exposition = self._own_metrics
        plane.running = lambda: self.admission.running + self.admission.waiting
        plane.on_shutdown = self._stop_admitting
        self.started = time.monotonic()
        self.shutting_down = False

    # -- checks -----------------------------------------------------------------------------------

    def authorize(self, authorization: str | None) -> None:
        """`authorization` is the header (HTTP) or metadata (gRPC) value: `Bearer <key>`."""
        if not self.cfg.api_keys:
            return
        header = authorization or ""
        given = header[7:] if header.lower().startswith("bearer ") else ""
        # Compare against every key so the time taken does not say which prefix matched.
        ok = False
        for key in self.cfg.api_keys:
            ok |= hmac.compare_digest(given.encode(), key.encode())
        if not ok:
            raise APIError(401, "Missing or invalid API key.", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        """An empty name means the served model (gRPC); the OpenAI schema requires one."""
        if name and name != self.model_id:
            raise APIError(404, f"The model '{name[:100]}' does not exist.", "model", "model_not_found")

    @contextlib.contextmanager
    def errors_counted(self) -> Iterator[None]:
        """Count an error leaving the block in `epd:request_errors_total` (type, stage)."""
        try:
            yield
        except APIError as exc:
            self.metrics.observe_error(exc.error_type, exc.stage)
            raise
        except Exception:
            self.metrics.observe_error("internal", "gateway")
            raise

    # -- requests ---------------------------------------------------------------------------------

    async def generate(
        self, request: GenerateRequest, arrival: float, prefix: str = "req", timeout_s: float | None = None
    ) -> Generation:
        """The request checked, admitted, prepared and started, its first event awaited. The caller
        iterates `events()` and must `close()` it."""
        check_bounds(request)
        self.check_model(request.model)
        limit = self.cfg.request_timeout_s
        timeout_s = limit if timeout_s is None else max(min(timeout_s, limit), 0.0)
        # Checked before admission: a schema that cannot compile is a 400 that costs no slot.
        grammar = await asyncio.to_thread(self.grammars.grammar_for, request)
        if request.is_chat:
            check_sequences(self.cfg, request)
            messages, images = chat_messages(self.cfg, request)
            budget = request_budget(self.inputs.image_processor.cfg, request.min_pixels, request.max_pixels)
            pruning = self.pruning_rates(request)
            tools = template_tools(request.tools) if request.tools else None
            for _ in range(request.n):  # demand, counted before admission (a 429 is load too)
                self.metrics.arrive(arrival, bool(images))
            # Admitted before any image is fetched or decoded: the request's images are charged to it.
            ticket = await self.admission.acquire(request.n)
            queue_s = time.perf_counter() - arrival
            try:
                loaded = await self.media.load_all(images, ticket, video_sampling(request))
                planned = await asyncio.to_thread(self._plan, images, loaded.items, budget)
                spec, media = await self._chat_spec(messages, planned, tools, loaded.video_seconds, pruning)
                check_visual_tokens(self._image_tokens(spec), self.cfg.max_visual_tokens)
                check_tokens(self.cfg, len(spec.token_ids) * request.n, "messages")
                params = sampling_params(
                    self.cfg, request, len(spec.token_ids), self.max_model_len, self.vocab_size, grammar
                )
                seed = request.sampling.seed
                self._count_visual(spec, planned, request.n)
                if self.cfg.media_decode == "gateway":
                    media = await self._decode_here(media)
                choices = [Choice(i, spec, seeded(params, seed, i), media) for i in range(request.n)]
            except BaseException:
                ticket.release()
                raise
        else:
            prompts = request.prompts or ()
            if not prompts or any(not p for p in prompts):
                message = "prompt must be a non-empty string or list of non-empty strings."
                raise APIError(400, message, request.prompt_param)
            check_sequences(self.cfg, request)
            # Client text: special-token text in a prompt is plain text, never a control token or pad.
            specs = [await asyncio.to_thread(self.inputs.spec_from_text, prompt) for prompt in prompts]
            check_tokens(self.cfg, sum(len(s.token_ids) for s in specs) * request.n, request.prompt_param)
            choices = []
            for p, spec in enumerate(specs):
                params = sampling_params(
                    self.cfg, request, len(spec.token_ids), self.max_model_len, self.vocab_size, grammar
                )
                choices += [
                    Choice(p * request.n + i, spec, seeded(params, request.sampling.seed, i))
                    for i in range(request.n)
                ]
            for _ in choices:  # demand, counted before admission (a 429 is load too)
                self.metrics.arrive(arrival, False)
            ticket = await self.admission.acquire(len(choices))
            queue_s = time.perf_counter() - arrival
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        generation = Generation(
            self.pipeline, self.metrics, request_id, choices, arrival, queue_s, ticket, timeout_s
        )
        await generation.prime()  # no worker for a stage: an APIError now, before any answer
        return generation

    async def tokenize(self, request: GenerateRequest) -> Tokenized:
        """The prompt tokens the request would run (image pads expanded), under the same checks; media
        are fetched and their headers read under admission (their sizes decide their token counts),
        never decoded."""
        check_bounds(request)
        self.check_model(request.model)
        if not request.is_chat:
            prompt = (request.prompts or ("",))[0]
            if not prompt:
                raise APIError(400, "prompt must be a non-empty string.", request.prompt_param)
            spec = await asyncio.to_thread(self.inputs.spec_from_text, prompt)
            return Tokenized(list(spec.token_ids), 0)
        messages, images = chat_messages(self.cfg, request)
        budget = request_budget(self.inputs.image_processor.cfg, request.min_pixels, request.max_pixels)
        ticket = await self.admission.acquire(1) if images else None
        try:
            loaded = await self.media.load_all(images, ticket, video_sampling(request))
            planned = await asyncio.to_thread(self._plan, images, loaded.items, budget)
            tools = template_tools(request.tools) if request.tools else None
            spec, _ = await self._chat_spec(messages, planned, tools, None, self.pruning_rates(request))
        finally:
            if ticket is not None:
                ticket.release()
        return Tokenized(list(spec.token_ids), self._image_tokens(spec))

    def pruning_rates(self, request: GenerateRequest) -> tuple[float, float]:
        """(image, video) pruning at the encoder: the request's, else the server's; at most the
        server's maximum (400 above it)."""
        rates = []
        for kind, asked, default in (
            ("image", request.image_pruning_rate, self.cfg.image_pruning_rate),
            ("video", request.video_pruning_rate, self.cfg.video_pruning_rate),
        ):
            if asked is not None and not 0 <= asked <= self.cfg.max_pruning_rate:
                message = f"must be from 0 to {self.cfg.max_pruning_rate:g} on this server"
                raise invalid_value(f"mm_processor_kwargs.{kind}_pruning_rate", message)
            rates.append(default if asked is None else asked)
        return rates[0], rates[1]

    async def _chat_spec(
        self,
        messages: list,
        images: list,
        tools: list | None = None,
        video_seconds: list | None = None,
        pruning: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[PromptSpec, list]:
        try:
            return await asyncio.to_thread(
                self.inputs.spec_from_messages, messages, images, tools, video_seconds, pruning
            )
        except (ValueError, TemplateError) as exc:  # ours, or the chat template's raise_exception
            message = f"The messages could not be turned into a prompt: {str(exc)[:300]}."
            raise APIError(400, message, "messages") from None

    def _plan(self, refs: list[MediaRef], items: list[MediaItem], budget: PixelBudget) -> list[MediaItem]:
        """Each image at the size its budget gives (its `detail`, else the request's), videos at their
        declared size; each keyed by its bytes and that plan."""
        cfg = self.inputs.image_processor.cfg
        planned = []
        for ref, item in zip(refs, items, strict=True):
            size = (
                item.size
                if item.video
                else fitted_size(*item.size, cfg, detail_budget(cfg, ref.detail, budget))
            )
            planned.append(
                replace(item, size=size, key=MediaItem.digest(item.data, item.video, size, item.frames))
            )
        return planned

    async def _decode_here(self, items: list[MediaItem]) -> list[np.ndarray]:
        """`--media-decode gateway`: the planned items decoded on this process's threads, shipped as
        pixels (a rejection is the client's 4xx here)."""
        try:
            pixels = await asyncio.gather(*(asyncio.to_thread(decode_item, item) for item in items))
        except MediaRejected as exc:
            r = exc.rejection
            raise APIError(r.status, r.message, r.param, r.code) from None
        for item in items:
            self.metrics.media_decoded.labels(self.model_id, "video" if item.video else "image").inc()
        return list(pixels)

    def _image_tokens(self, spec: PromptSpec) -> int:
        return sum(self.inputs.model_config.media_tokens(spec.grids, spec.keep))

    def _count_visual(self, spec: PromptSpec, items: list[MediaItem], n: int) -> None:
        """`epd:visual_tokens_total`: each item's kept and pruned tokens, by kind, once per choice."""
        model = self.inputs.model_config
        kept = model.media_tokens(spec.grids, spec.keep)
        for item, grid, k in zip(items, spec.grids, kept, strict=True):
            kind = "video" if item.video else "image"
            self.metrics.visual_tokens.labels(self.model_id, kind, "kept").inc(k * n)
            self.metrics.visual_tokens.labels(self.model_id, kind, "pruned").inc(
                (model.num_image_tokens(grid) - k) * n
            )

    def _pruned_tokens(self, spec: PromptSpec) -> int:
        whole = sum(self.inputs.model_config.num_image_tokens(g) for g in spec.grids)
        return whole - self._image_tokens(spec)

    def usage(self, choices: list[Choice]) -> Usage:
        prompts = {id(c.spec): c.spec for c in choices}.values()
        return Usage(
            prompt_tokens=sum(len(s.token_ids) for s in prompts),
            completion_tokens=sum(len(c.token_ids) for c in choices),
            image_tokens=sum(self._image_tokens(s) for s in prompts),
            video_tokens=sum(s.token_ids.count(self.inputs.model_config.video_token_id) for s in prompts),
            pruned_tokens=sum(self._pruned_tokens(s) for s in prompts),
        )

    # -- state ------------------------------------------------------------------------------------

    def roles_ready(self) -> dict[Role, bool]:
        """Whether each role has a worker taking its work now."""
        return self.plane.ready()

    async def scrape(self) -> bytes:
        """The metrics in Prometheus' text format, with fresh worker stats: each worker is read with
        its own timeout, and one that does not answer is left out of this scrape alone."""
        answered = await self.plane.refresh_stats()
        self.worker_stats.stats = dict(answered or {})
        own = self._own_metrics()
        if self.plane.replicas:  # several gateways: every one's request series, labelled by gateway
            own = merge_replicas({**self.plane.replicas, self.plane.gateway_id: own})
        return own + generate_latest(self.deployment)

    def _own_metrics(self) -> bytes:
        """This replica's request series, its admission gauges read now."""
        self.metrics.running.labels(self.model_id).set(self.admission.running)
        self.metrics.waiting.labels(self.model_id).set(self.admission.waiting)
        self.metrics.sequences_running.labels(self.model_id).set(self.admission.sequences)
        self.metrics.image_pixels.labels(self.model_id).set(self.admission.pixels)
        return generate_latest(self.metrics.registry)

    def slo(self) -> SLOStatus:
        def count(name: str) -> int:
            value = self.metrics.registry.get_sample_value(name, {"model_name": self.model_id})
            return int(value or 0)

        return SLOStatus(
            ttft_target_s=self.cfg.slo_ttft_s,
            tpot_target_s=self.cfg.slo_tpot_s,
            requests=count("epd:slo_requests_total"),
            ttft_met=count("epd:slo_ttft_met_total"),
            tpot_met=count("epd:slo_tpot_met_total"),
            met=count("epd:slo_met_total"),
            window_s=time.monotonic() - self.started,
        )

    def _stop_admitting(self) -> None:
        self.shutting_down = True
        self.admission.close()

    async def begin_shutdown(self) -> int:
        """Stop admitting new requests (503 + Retry-After), here and on every other gateway replica,
        and wait for the running ones to finish everywhere, up to the configured grace; returns how
        many were still running here at the end."""
        self._stop_admitting()
        with contextlib.suppress(Exception):  # the control plane unreachable: this replica alone
            await self.plane.begin_shutdown()
        deadline = time.monotonic() + self.cfg.shutdown_grace_s
        while time.monotonic() < deadline:
            if not (self.admission.running or self.admission.waiting):
                try:
                    if await self.plane.running_elsewhere() == 0:
                        break
                except Exception:  # noqa: BLE001 - no control plane to ask: this replica is done
                    break
            await asyncio.sleep(0.1)
        return self.admission.running
