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


def default_model_dir(preset: str = DEFAULT_PRESET) -> Path:
    """The built-in model's directory; its name is the model id the server reports (`epd-tiny`)."""
    return cache_dir() / "models" / f"epd-{preset}"


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
    max_num_seqs: int = Field(64, ge=1, description="Most requests in the running decode batch.")
    max_prefill_tokens: int = Field(
        8192, ge=16, description="Token budget of one prefill batch (a longer prompt runs alone)."
    )
    max_model_len: int = Field(8192, ge=16, description="Longest prompt plus output, in tokens.")
    max_encode_images: int = Field(16, ge=1, description="Most images in one encode batch.")
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
    embedding_slot_tokens: int = Field(64, ge=1, description="Visual tokens per embedding slot.")
    admission_timeout_s: float = Field(
        60.0, gt=0, description="How long a decode waits for KV room before the request fails."
    )
