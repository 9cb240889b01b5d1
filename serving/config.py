"""The one typed configuration tree. Environment variables are read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PRESET = "tiny"


def cache_dir() -> Path:
    """Where built models live: $EPD_CACHE_DIR, else $XDG_CACHE_HOME/epd, else ~/.cache/epd."""
    if explicit := os.environ.get("EPD_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "epd"


def cpu_kernels_enabled() -> bool:
    """`EPD_CPU_KERNELS=0` turns off the engine's C kernels and packed linears (for debugging; the torch
    paths give the same results within float rounding)."""
    return os.environ.get("EPD_CPU_KERNELS", "1") != "0"


def default_model_dir(preset: str = DEFAULT_PRESET) -> Path:
    """A built-in random-weight model's directory; its name is the model id the server reports
    (`epd-tiny`)."""
    return cache_dir() / "models" / f"epd-{preset}"


def default_model() -> Path:
    """The model served when none is named: `epd-shapes`, trained on the shapes-world task and shipped
    inside the package (serving/assets), so its answers can be checked (docs/evals.md)."""
    return Path(__file__).parent / "assets" / "epd-shapes"


class EngineConfig(BaseModel):
    """Everything the engine of one worker needs: which model, on what device, how it batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Local directory of a Hugging Face-format Qwen2-VL / Qwen2.5-VL model.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks cuda when it is available, else cpu."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto is float32 on CPU and bfloat16 on CUDA."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block.")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV pool size in blocks; None derives it from kv_cache_memory_gb."
    )
    kv_cache_memory_gb: float = Field(
        0.25, gt=0, description="Memory for the KV pool when num_kv_blocks is unset."
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="On CUDA: size the KV pool to this fraction of the device's memory, less the weights, "
        "a profiled activation peak and what other processes hold (replaces kv_cache_memory_gb).",
    )
    max_num_seqs: int = Field(64, ge=1, description="Most requests in the running decode batch.")
    max_prefill_tokens: int = Field(
        8192, ge=16, description="Most prompt tokens prefilled in one step (within max_step_tokens)."
    )
    # The budget trades TTFT against TPOT: a prompt prefilled in fewer, larger steps starts later but
    # stalls the running streams fewer times. Served on 2 cores (the `small` model, ~600-token prompts,
    # 16 concurrent, float32), TTFT / TPOT medians were 0.52 s / 34 ms at 256, 1.13 / 29.5 at 1024, 1.52 /
    # 27.3 at 1536, 1.78 / 24.9 at 2048 (vLLM-CPU's default, which gave 1.68 / 30.5 there), throughput
    # within 2 % of each other (in process 1024 was 3-4 % ahead of 256). 1024 keeps TTFT well under the
    # 2048 budget's; its longest stall (ITL p99) was 0.4 s there against 0.2 s at 256.
    max_step_tokens: int = Field(
        1024,
        ge=16,
        description="Token budget of one engine step: a token for each running request first, then "
        "prefill chunks (vLLM's max_num_batched_tokens); a longer prompt is prefilled over several steps.",
    )
    max_model_len: int = Field(8192, ge=16, description="Longest prompt plus output, in tokens.")
    max_encode_images: int = Field(16, ge=1, description="Most images in one encode batch.")
    # Between a burst's vision batches the running requests step and the encoded ones start their
    # prefill. Served colocated on one core (`small`, image-heavy: 1-3 images of 256-1,024 patches,
    # two runs each): server TTFT at 12 concurrent 2.02 / 1.63 s at 1,024 against 2.40 / 1.85 s at
    # 4,096 and 2.33 / 2.30 s with no limit (every queued image in one batch, as before), throughput
    # within the runs' noise, TPOT p50 higher (110 / 93 ms against 90 / 78). A GPU encodes a bigger
    # batch at little extra cost per image: raise it there.
    max_encode_patches: int = Field(
        1024,
        ge=1,
        description="Vision patches a worker encodes between two engine steps: queued requests' media "
        "join a vision batch in arrival order up to this (one request's media is never split; one "
        "request always goes), the rest after the next step.",
    )
    image_pruning_method: Literal["divprune", "random"] = Field(
        "divprune", description="Which image tokens pruning keeps (random: the baseline)."
    )
    kv_compaction_method: Literal["snapkv", "random"] = Field(
        "snapkv", description="Which visual tokens' KV compaction keeps (random: the baseline)."
    )
    video_pruning_method: Literal["evs", "random"] = Field(
        "evs", description="Which video tokens pruning keeps (random: the baseline)."
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Reuse the KV of full prompt blocks another request already computed (same tokens "
        "and images before them); off: every prompt is prefilled whole.",
    )
    max_images_per_request: int = Field(8, ge=0, description="Most images one request may carry.")


class WorkerConfig(BaseModel):
    """One stage worker: its engine, the stages it serves, how it moves tensors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Unique worker name; also its transport agent name.")
    roles: str = Field(
        "epd", pattern="^e?p?d?$", min_length=1, description="Stages served: e, p, d or a mix."
    )
    engine: EngineConfig
    transport: Literal["nixl", "inproc"] = Field("nixl", description="nixl across processes; inproc in one.")
    lease_ttl_s: float = Field(30.0, gt=0, description="How long held KV or embeddings wait to be pulled.")
    embedding_cache_mb: float = Field(64.0, ge=0, description="Encode-stage cache of visual embeddings.")
    embedding_slots: int = Field(256, ge=1, description="Slots of the registered embedding buffer.")
    kv_transfer_dtype: Literal["auto", "int8"] = Field(
        "auto",
        description="KV from prefill to decode as the pool holds it (auto, lossless) or in int8 with "
        "per-token, per-head scales (lossy; about 4x fewer bytes from float32, 2x from bfloat16).",
    )
    embedding_slot_tokens: int = Field(64, ge=1, description="Visual tokens per embedding slot.")
    cpus: tuple[int, ...] = Field(
        (), description="Pin the worker's process to these CPUs; empty: no pinning."
    )
    runtime_cpus: tuple[int, ...] = Field(
        (),
        description="With cpus: once the engine runs, every thread but the engine's (Ray, transport, "
        "streams) moves to these CPUs; empty: they stay on cpus.",
    )
    threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads; 0: one per pinned CPU, or torch's default when unpinned.",
    )
    admission_timeout_s: float = Field(
        60.0, gt=0, description="How long a decode waits for KV room before trying another worker."
    )
    prefill_kv_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="KV pool of a worker that prefills but does not decode, as a share of a decode "
        "worker's (never less than one request of max_model_len).",
    )
    engine_stuck_after_s: float = Field(
        120.0, gt=0, description="An engine pass running longer than this marks the worker failed."
    )


class ControlConfig(BaseModel):
    """The control plane: health checks, replacement of failed workers, drains, migrations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    health_interval_s: float = Field(1.0, gt=0, description="How often every worker's stats are read.")
    health_timeout_s: float = Field(
        10.0, gt=0, description="A worker whose stats call takes longer than this is failed and replaced."
    )
    max_worker_restarts: int = Field(
        10, ge=0, description="Failed workers replaced over the deployment's life; past it they are not."
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="How long a drain waits for in-flight work; then decodes migrate."
    )
    wait_for_worker_s: float = Field(
        10.0,
        gt=0,
        description="How long a request waits for a worker able to take a stage, while one is starting or "
        "being switched to it, before 503 (with none on its way: 503 at once).",
    )
    max_leg_attempts: int = Field(3, ge=1, description="Tries of an E or P leg, each on another worker.")
    max_migrations: int = Field(2, ge=0, description="Times one request's decode may move to another worker.")


class ControllerConfig(BaseModel):
    """The SLO-driven controller: how often it looks, what it may do, and its bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["off", "advisory", "on"] = Field(
        "off", description="off; advisory (log and export what it would do); on (act)."
    )
    tick_s: float = Field(2.0, gt=0, description="How often it observes and decides.")
    window_s: float = Field(20.0, gt=0, description="Sliding window of finished requests it judges by.")
    cooldown_s: float = Field(10.0, ge=0, description="Quiet time after any action.")
    min_gain: float = Field(
        0.05, ge=0, le=1, description="Predicted SLO-attainment gain a move must bring (hysteresis)."
    )
    attainment_target: float = Field(0.9, gt=0, le=1, description="Share of requests that must meet the SLO.")
    min_requests: int = Field(8, ge=1, description="Finished requests in the window before it acts.")
    max_workers: int = Field(0, ge=0, description="It may add workers up to this many; 0: never adds.")
    min_workers: int = Field(0, ge=0, description="It may remove workers down to this many; 0: never.")
    manage_admission: bool = Field(
        False, description="Set the gateway's concurrent-sequence limit to what the decode pool holds in SLO."
    )
    profile: str | None = Field(
        None, description="`epd profile` output to start the cost model from; measured times refine it."
    )


class GatewayConfig(BaseModel):
    """The OpenAI-compatible front door: limits, media safety, auth, admission, SLO targets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=1, le=65535)
    http_in_replica: bool = Field(
        False,
        description="The gateway replica serves HTTP on host:port itself (`epd serve` on a local Ray); "
        "off: Ray Serve's HTTP proxy does (a Serve config, KubeRay).",
    )
    replicas: int = Field(
        1,
        ge=1,
        le=64,
        description="Gateway replicas (Serve replicas) in front of the one control plane. With "
        "`http_in_replica` each binds host:port with SO_REUSEPORT and the kernel spreads connections.",
    )
    api_keys: tuple[str, ...] = Field((), description="Accepted bearer keys for /v1/*; empty: no auth.")
    metrics_require_key: bool = Field(False, description="Whether /metrics needs a key too.")
    allow_media_hosts: tuple[str, ...] = Field(
        (), description="Hosts whose images may be fetched even at loopback or private addresses."
    )
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="Largest request body; larger is 413.")
    max_image_bytes: int = Field(20 * 2**20, ge=1024, description="Largest encoded image, inline or fetched.")
    max_image_pixels: int = Field(
        6000 * 6000, ge=1, description="Largest width×height decoded; checked before decoding."
    )
    max_images_per_request: int = Field(8, ge=0, description="Images and videos one request may bring.")
    max_videos_per_request: int = Field(2, ge=0)
    media_uuid_cache_bytes: int = Field(
        256 * 2**20, ge=0, description="Fetched media kept by their clients' uuid for reuse (per replica)."
    )
    image_pruning_rate: float = Field(
        0.0, ge=0, lt=1, description="Share of each image's tokens pruned at the encoder by default (lossy)."
    )
    video_pruning_rate: float = Field(
        0.0, ge=0, lt=1, description="Share of each video's tokens pruned at the encoder by default (lossy)."
    )
    visual_kv_budget: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of a prompt's visual tokens whose KV prefill hands to decode (lossy below 1).",
    )
    max_pruning_rate: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="The most pruning a request may ask for (mm_processor_kwargs); above: 400.",
    )
    max_visual_tokens: int | None = Field(
        None, ge=1, description="Image and video tokens one request may bring; None: only the model length."
    )
    max_video_bytes: int = Field(64 * 2**20, ge=1024, description="Largest encoded video, inline or fetched.")
    video_fps: float = Field(2.0, gt=0, le=60, description="Frames sampled per second of video by default.")
    video_max_frames: int = Field(32, ge=2, le=1024, description="Most frames sampled from one video.")
    video_max_seconds: float = Field(
        600.0, gt=0, description="Longest video accepted (its declared duration)."
    )
    video_decode_timeout_s: float = Field(20.0, gt=0, description="Decoding one video past this is 422.")
    media_decode: Literal["worker", "gateway"] = Field(
        "worker",
        description="Where images and videos are decoded: on the worker that encodes them (the gateway "
        "ships compressed bytes and a plan), or on the gateway (it ships pixels).",
    )
    max_image_frames: int = Field(
        256, ge=1, description="Most frames an animated image may declare (only the first is decoded)."
    )
    max_request_media_bytes: int = Field(
        64 * 2**20, ge=1024, description="Encoded image bytes one request may bring in all; more is 413."
    )
    max_request_image_pixels: int = Field(
        2**26, ge=1, description="Declared width×height summed over one request's images; more is 413."
    )
    max_image_pixels_in_flight: int = Field(
        2**28,
        ge=1,
        description="Declared image pixels held by all requests in the gateway at once; more is 429.",
    )
    media_connect_timeout_s: float = Field(5.0, gt=0)
    media_read_timeout_s: float = Field(10.0, gt=0)
    media_total_timeout_s: float = Field(
        30.0, gt=0, description="One deadline for fetching all of a request's images; later is 422."
    )
    media_max_redirects: int = Field(3, ge=0)
    max_sequences_per_request: int = Field(
        64, ge=1, description="Prompts × n one request may run; more is 400."
    )
    max_request_tokens: int = Field(
        2**18,
        ge=1,
        description="Prompt tokens (image tokens included) × n summed over one request; more is 400.",
    )
    max_concurrent_requests: int = Field(
        64,
        ge=1,
        description="Sequences (a request's prompts × n) in the stages at once; a request larger than "
        "this runs alone.",
    )
    max_queued_requests: int = Field(256, ge=0, description="Requests waiting for admission; more is 429.")
    request_timeout_s: float = Field(600.0, gt=0, description="A request still running after this is ended.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    slo_ttft_s: float = Field(2.0, gt=0, description="TTFT target for the SLO counters.")
    slo_tpot_s: float = Field(0.2, gt=0, description="TPOT target for the SLO counters.")
    expose_openapi: bool = Field(False, description="Serve /openapi.json (off: it maps the attack surface).")
    grpc_port: int | None = Field(
        None, ge=1, le=65535, description="Port of the gRPC API beside HTTP (same host); None: no gRPC."
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )


def gateway_config_from_env(**overrides: object) -> GatewayConfig:
    """GatewayConfig from flags, with EPD_API_KEYS (comma-separated) as the fallback for keys."""
    if "api_keys" not in overrides and (keys := os.environ.get("EPD_API_KEYS")):
        overrides["api_keys"] = tuple(k for k in keys.split(",") if k)
    return GatewayConfig(**overrides)  # type: ignore[arg-type]
