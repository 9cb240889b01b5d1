"""The metrics catalog: every metric the server exports is declared here, once.

Names follow vLLM's (`vllm:` → `epd:`) so dashboards carry over, plus what no peer exports: the
per-stage breakdown of a request's time, bytes moved between stages, and SLO counters from which
attainment (`slo_met / slo_requests`) and goodput (`rate(slo_met)`) are one PromQL expression.

Workers live in other processes. The gateway pulls their stats at scrape time (`WorkerCollector`) and
exposes them labelled by worker, so one scrape of the gateway shows the whole deployment.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.controller.observation import Kind, RequestRecord
from serving.controller.window import WindowSink
from serving.telemetry.control_metrics import CONTROL_CATALOG
from serving.telemetry.controller_metrics import CONTROLLER_CATALOG
from serving.types import StageTimings, WorkerStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGES = ("media", "encode", "e2p_transfer", "prefill", "p2d_transfer", "decode")
QUEUED_STAGES = ("encode", "prefill")  # the stages whose workers queue requests for a batch
ERROR_TYPES = (
    "invalid_request",  # 4xx for the request itself (schema, media, context length, content type)
    "authentication",  # 401
    "rate_limited",  # 429: admission queue or image budget full
    "timeout",  # request_timeout_s passed
    "stage_failed",  # a worker stage failed the request
    "unavailable",  # 503
    "internal",  # anything unexpected
)
ERROR_STAGES = ("gateway", "encode", "prefill", "decode")
# The series touched at start, so a scrape lists them before the first error.
ERROR_SERIES = tuple((t, "gateway") for t in ERROR_TYPES) + tuple(
    ("stage_failed", s) for s in ERROR_STAGES[1:]
)


class Metrics:
    """The gateway's metrics, in their own registry (no process-global state)."""

    def __init__(self, model_name: str, slo_ttft_s: float, slo_tpot_s: float) -> None:
        self.registry = CollectorRegistry()
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        # Arrivals and finished requests of the last minutes, for the SLO controller; both front ends
        # account here. Set when a controller runs (it sizes the horizon); None: nothing is kept.
        self.window: WindowSink | None = None
        r, model = self.registry, ["model_name"]
        self.ttft = Histogram(
            "epd:time_to_first_token_seconds",
            "Time to first token.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "epd:inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            model,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "epd:request_time_per_output_token_seconds",
            "Per request: (end - first token) / (output tokens - 1).",
            model,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "epd:e2e_request_latency_seconds",
            "Arrival to last token.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "epd:request_queue_time_seconds",
            "Time waiting: gateway admission plus the prefill queue.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "epd:num_requests_running", "Requests admitted and in a stage.", model, registry=r
        )
        self.waiting = Gauge("epd:num_requests_waiting", "Requests waiting for admission.", model, registry=r)
        self.sequences_running = Gauge(
            "epd:num_sequences_running",
            "Sequences (prompts × n) of the admitted requests: what admission counts.",
            model,
            registry=r,
        )
        self.image_pixels = Gauge(
            "epd:image_pixels_in_flight",
            "Declared pixels of the images held by admitted requests.",
            model,
            registry=r,
        )
        self.errors = Counter(
            "epd:request_errors",
            "Requests that ended in an error, by type and by the stage it came from.",
            model + ["error_type", "stage"],
            registry=r,
        )
        self.prompt_tokens = Counter("epd:prompt_tokens", "Prompt tokens processed.", model, registry=r)
        self.generation_tokens = Counter("epd:generation_tokens", "Tokens generated.", model, registry=r)
        self.success = Counter(
            "epd:request_success",
            "Finished requests by finish reason.",
            model + ["finished_reason"],
            registry=r,
        )
        self.stage = Histogram(
            "epd:stage_duration_seconds",
            "Time a request spent in each stage.",
            model + ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.transfer_bytes = Counter(
            "epd:transfer_bytes", "Bytes moved between stages.", model + ["edge"], registry=r
        )
        self.stage_queue = Histogram(
            "epd:stage_queue_time_seconds",
            "Time a request waited in a worker's queue before its encode or prefill batch.",
            model + ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.media_decoded = Counter(
            "epd:media_decoded",
            "Images and videos decoded at the gateway (--media-decode gateway; workers count their own).",
            ["model_name", "kind"],
            registry=r,
        )
        self.visual_tokens = Counter(
            "epd:visual_tokens",
            "Image and video tokens of admitted requests (per choice): kept, and taken out by pruning.",
            model + ["kind", "state"],
            registry=r,
        )
        self.media_uuid_hits = Counter(
            "epd:media_uuid_hits",
            "Media parts served by their uuid, not fetched or decoded again.",
            model,
            registry=r,
        )
        self.slo_requests = Counter("epd:slo_requests", "Requests judged against the SLO.", model, registry=r)
        self.slo_ttft_met = Counter(
            "epd:slo_ttft_met", "Requests with TTFT within the SLO.", model, registry=r
        )
        self.slo_tpot_met = Counter(
            "epd:slo_tpot_met", "Requests with TPOT within the SLO.", model, registry=r
        )
        self.slo_met = Counter(
            "epd:slo_met", "Requests within both SLOs (goodput numerator).", model, registry=r
        )
        self.slo_target = Gauge(
            "epd:slo_target_seconds", "Configured SLO targets.", model + ["slo"], registry=r
        )
        self.slo_target.labels(model_name, "ttft").set(slo_ttft_s)
        self.slo_target.labels(model_name, "tpot").set(slo_tpot_s)
        self.model = model_name
        # Touch every labelled series so a scrape lists each metric from the start.
        for stage in STAGES:
            self.stage.labels(model_name, stage)
        for edge in ("e2p", "p2d"):
            self.transfer_bytes.labels(model_name, edge)
        for stage in QUEUED_STAGES:
            self.stage_queue.labels(model_name, stage)
        for m in (
            self.ttft,
            self.itl,
            self.tpot,
            self.e2e,
            self.queue_time,
            self.running,
            self.waiting,
            self.sequences_running,
            self.image_pixels,
            self.prompt_tokens,
            self.generation_tokens,
            self.slo_requests,
            self.slo_ttft_met,
            self.slo_tpot_met,
            self.slo_met,
        ):
            m.labels(model_name)
        for reason in ("stop", "length", "abort", "error"):
            self.success.labels(model_name, reason)
        for error_type, stage in ERROR_SERIES:
            self.errors.labels(model_name, error_type, stage)
        for kind in ("image", "video"):
            self.media_decoded.labels(model_name, kind)
            for state in ("kept", "pruned"):
                self.visual_tokens.labels(model_name, kind, state)
        self.media_uuid_hits.labels(model_name)

    def observe_error(self, error_type: str, stage: str) -> None:
        """One request that ended in an error (`ERROR_TYPES`, `ERROR_STAGES`; others are folded in)."""
        error_type = error_type if error_type in ERROR_TYPES else "internal"
        stage = stage if stage in ERROR_STAGES else "gateway"
        self.errors.labels(self.model, error_type, stage).inc()

    def arrive(self, at: float, has_images: bool) -> None:
        """A sequence asked for, admitted or not (the controller's arrival rates)."""
        if self.window is not None:
            self.window.arrive(at, Kind.IMAGE if has_images else Kind.TEXT)

    def observe_request(
        self,
        *,
        arrival: float,
        first_token: float | None,
        end: float,
        token_times: list[float],
        prompt_tokens: int,
        output_tokens: int,
        finish_reason: str,
        timings: StageTimings,
        queue_s: float,
    ) -> None:
        """Record one finished request; TTFT and TPOT exactly as the design doc defines them."""
        m = self.model
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(output_tokens)
        self.success.labels(m, finish_reason).inc()
        self.e2e.labels(m).observe(end - arrival)
        self.queue_time.labels(m).observe(queue_s + (timings.prefill_queue_s or 0.0))
        for stage in STAGES:
            key = f"{stage}_s"
            if (value := getattr(timings, key)) is not None:
                self.stage.labels(m, stage).observe(value)
        for stage in QUEUED_STAGES:
            if (value := getattr(timings, f"{stage}_queue_s")) is not None:
                self.stage_queue.labels(m, stage).observe(value)
        for edge in ("e2p", "p2d"):
            if (nbytes := getattr(timings, f"{edge}_bytes")) is not None:
                self.transfer_bytes.labels(m, edge).inc(nbytes)
        for a, b in zip(token_times, token_times[1:], strict=False):
            self.itl.labels(m).observe(b - a)
        if self.window is not None and finish_reason != "abort":  # a client that left is no evidence
            self.window.add(
                _record(
                    arrival, first_token, end, prompt_tokens, output_tokens, finish_reason, timings, queue_s
                )
            )
        if first_token is None or finish_reason in ("abort", "error"):
            return
        ttft = first_token - arrival
        self.ttft.labels(m).observe(ttft)
        tpot = (end - first_token) / (output_tokens - 1) if output_tokens > 1 else 0.0
        if output_tokens > 1:
            self.tpot.labels(m).observe(tpot)
        ttft_ok, tpot_ok = ttft <= self.slo_ttft_s, tpot <= self.slo_tpot_s
        self.slo_requests.labels(m).inc()
        self.slo_ttft_met.labels(m).inc(ttft_ok)
        self.slo_tpot_met.labels(m).inc(tpot_ok)
        self.slo_met.labels(m).inc(ttft_ok and tpot_ok)


def _record(
    arrival: float,
    first_token: float | None,
    end: float,
    prompt_tokens: int,
    output_tokens: int,
    finish_reason: str,
    timings: StageTimings,
    queue_s: float,
) -> RequestRecord:
    """The controller's view of a finished request. A request went through encode iff it had images;
    their token count is not known here, so it is left at 0 and the controller's cost model is
    calibrated per request kind instead."""
    kind = Kind.IMAGE if timings.encode_s is not None else Kind.TEXT
    # The encode worker's service is its media decoding and its vision batch: both grow with the
    # images, and another encode worker takes both on.
    encode_s = None if timings.encode_s is None else timings.encode_s + (timings.media_s or 0.0)
    return RequestRecord.finished(
        arrival,
        first_token,
        end,
        kind,
        (prompt_tokens, 0, output_tokens),
        finish_reason in ("stop", "length"),
        queue_s=queue_s,
        encode_queue_s=timings.encode_queue_s,
        encode_s=encode_s,
        e2p_s=timings.e2p_transfer_s,
        prefill_queue_s=timings.prefill_queue_s,
        prefill_s=timings.prefill_s,
        p2d_s=timings.p2d_transfer_s,
    )


class WorkerCollector(Collector):
    """Exposes the latest stats pulled from every worker (refreshed by the gateway before a scrape)."""

    def __init__(self, model_name: str) -> None:
        self.model = model_name
        self.stats: dict[str, WorkerStats] = {}

    def collect(self) -> Iterator[Metric]:
        kv = GaugeMetricFamily(
            "epd:kv_cache_usage_perc", "KV cache blocks in use, 0..1.", labels=["model_name", "worker"]
        )
        queries = CounterMetricFamily(
            "epd:mm_cache_queries", "Embedding cache lookups.", labels=["model_name", "worker"]
        )
        hits = CounterMetricFamily(
            "epd:mm_cache_hits", "Embedding cache hits.", labels=["model_name", "worker"]
        )
        prefix_queries = CounterMetricFamily(
            "epd:prefix_cache_queries",
            "Prompt tokens looked up in the KV prefix cache (vLLM's prefix_cache_queries).",
            labels=["model_name", "worker"],
        )
        prefix_hits = CounterMetricFamily(
            "epd:prefix_cache_hits",
            "Prompt tokens whose KV came from the prefix cache.",
            labels=["model_name", "worker"],
        )
        expired = CounterMetricFamily(
            "epd:lease_expired", "Leases that expired unpulled.", labels=["model_name", "worker"]
        )
        encoded = CounterMetricFamily(
            "epd:images_encoded", "Images run through the vision tower.", labels=["model_name", "worker"]
        )
        decoded = CounterMetricFamily(
            "epd:worker_media_decoded",
            "Images and videos the gateway shipped compressed, decoded on the worker.",
            labels=["model_name", "worker", "kind"],
        )
        compacted = CounterMetricFamily(
            "epd:visual_kv_tokens",
            "Visual tokens of compacted P→D handoffs whose KV rows were kept or dropped (prefill workers).",
            labels=["model_name", "worker", "state"],
        )
        running = GaugeMetricFamily(
            "epd:worker_requests_running",
            "Requests in a worker's engine batch.",
            labels=["model_name", "worker"],
        )
        waiting = GaugeMetricFamily(
            "epd:worker_requests_waiting",
            "Requests queued in a worker's engine for a batch.",
            labels=["model_name", "worker"],
        )
        backend = GaugeMetricFamily(
            "epd:engine_backend_info",
            "1 per worker, labelled with its engine's device and how its CPU kernels stand "
            "(built, off, no-compiler, failed: the torch paths run, 2-5x slower).",
            labels=["model_name", "worker", "backend", "kernels"],
        )
        pool = GaugeMetricFamily(
            "epd:kv_cache_tokens",
            "Tokens a worker's KV pool holds: its blocks times the block size (an encode-only worker: one).",
            labels=["model_name", "worker"],
        )
        for worker, s in sorted(self.stats.items()):
            labels = [self.model, worker]
            kv.add_metric(labels, s.kv_cache_usage)
            queries.add_metric(labels, s.mm_cache_hits + s.mm_cache_misses)
            hits.add_metric(labels, s.mm_cache_hits)
            prefix_queries.add_metric(labels, s.prefix_cache_queried_tokens)
            prefix_hits.add_metric(labels, s.prefix_cache_hit_tokens)
            expired.add_metric(labels, s.leases_expired)
            encoded.add_metric(labels, s.images_encoded)
            decoded.add_metric([*labels, "image"], s.images_decoded)
            decoded.add_metric([*labels, "video"], s.videos_decoded)
            compacted.add_metric([*labels, "kept"], s.visual_kv_kept)
            compacted.add_metric([*labels, "dropped"], s.visual_kv_dropped)
            running.add_metric(labels, s.num_running)
            waiting.add_metric(labels, s.num_waiting)
            pool.add_metric(labels, s.kv_tokens_total)
            backend.add_metric([*labels, s.backend, s.kernels], 1)
        yield from (
            kv,
            queries,
            hits,
            prefix_queries,
            prefix_hits,
            expired,
            encoded,
            decoded,
            compacted,
            running,
            waiting,
            pool,
            backend,
        )


CATALOG = (
    "epd:time_to_first_token_seconds",
    "epd:inter_token_latency_seconds",
    "epd:request_time_per_output_token_seconds",
    "epd:e2e_request_latency_seconds",
    "epd:request_queue_time_seconds",
    "epd:num_requests_running",
    "epd:num_requests_waiting",
    "epd:num_sequences_running",
    "epd:image_pixels_in_flight",
    "epd:request_errors_total",
    "epd:prompt_tokens_total",
    "epd:generation_tokens_total",
    "epd:request_success_total",
    "epd:stage_duration_seconds",
    "epd:transfer_bytes_total",
    "epd:media_decoded_total",
    "epd:media_uuid_hits_total",
    "epd:visual_tokens_total",
    "epd:slo_requests_total",
    "epd:slo_ttft_met_total",
    "epd:slo_tpot_met_total",
    "epd:slo_met_total",
    "epd:slo_target_seconds",
    "epd:kv_cache_usage_perc",
    "epd:mm_cache_queries_total",
    "epd:mm_cache_hits_total",
    "epd:prefix_cache_queries_total",
    "epd:prefix_cache_hits_total",
    "epd:lease_expired_total",
    "epd:images_encoded_total",
    "epd:worker_media_decoded_total",
    "epd:visual_kv_tokens_total",
    "epd:stage_queue_time_seconds",
    "epd:worker_requests_running",
    "epd:worker_requests_waiting",
    "epd:kv_cache_tokens",
    "epd:engine_backend_info",
    *CONTROL_CATALOG,
    *CONTROLLER_CATALOG,
)
"""Every exported series name, as a scrape shows it (counters gain `_total`)."""
