"""Load a Hugging Face-format checkpoint directory (single or sharded safetensors) into our modules."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from serving.engine.models.config import ModelConfig, load_model_config
from serving.engine.models.decoder import fuse_projections
from serving.engine.models.qwen2_vl import Qwen2VL

# transformers v5 module paths, seen in checkpoints saved without its conversion mapping.
_PREFIX_MAP = (("model.language_model.", "model."), ("model.visual.", "visual."))


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def canonical_name(name: str) -> str:
    for old, new in _PREFIX_MAP:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def load_model(
    model_dir: str | Path, dtype: torch.dtype, device: torch.device, cfg: ModelConfig | None = None
) -> Qwen2VL:
    model_dir = Path(model_dir)
    cfg = cfg or load_model_config(model_dir)
    with torch.device("meta"):
        model = Qwen2VL(cfg)
    expected = set(model.state_dict())
    if cfg.text.tie_word_embeddings:
        expected.discard("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    for shard in checkpoint_files(model_dir):
        for name, tensor in load_file(str(shard), device=str(device)).items():
            name = canonical_name(name)
            if name in expected:
                state[name] = tensor.to(dtype)
    missing = expected - set(state)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    fuse_projections(model)
    # What runs on this device beyond torch's own ops (packed linears, the one-call decode step) is
    # the attention backend's to set up (`AttentionBackend.prepare`).
    return model.requires_grad_(False).eval()
