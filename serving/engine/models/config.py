"""Model hyper-parameters read from a Hugging Face `config.json` (nested v5 layout or the flat legacy one)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


@dataclass(frozen=True)
class VisionConfig:
    family: str  # "qwen2_vl" or "qwen2_5_vl"
    depth: int
    embed_dim: int
    out_dim: int
    num_heads: int
    mlp_dim: int
    hidden_act: str
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    rope_theta: float
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    # Qwen2.5-VL: M-RoPE temporal positions per second of video (a video's temporal patch k sits at
    # k · tokens_per_second · seconds per patch); Qwen2-VL steps one per patch.
    tokens_per_second: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    tie_word_embeddings: bool
    max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...]

    @property
    def family(self) -> str:
        return self.vision.family

    @property
    def media_pad_ids(self) -> tuple[int, int]:
        """The pad tokens that stand for visual embeddings: an image's and a video's."""
        return (self.image_token_id, self.video_token_id)

    def media_tokens(self, grids: list[tuple[int, int, int]], keep: list[int] | None = None) -> list[int]:
        """Each item's pad count: what pruning keeps (`keep`, per item), else its whole grid's."""
        return list(keep) if keep else [self.num_image_tokens(g) for g in grids]

    def num_image_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * h * w // self.vision.spatial_merge_size**2

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.text.num_layers * self.text.num_kv_heads * self.text.head_dim * dtype_bytes


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
    return rope


def _parse_vision(raw: dict[str, Any], family: str, text_hidden: int) -> VisionConfig:
    rope_theta = float(_rope(raw).get("rope_theta", 10000.0)) if "rope_parameters" in raw else 10000.0
    common = dict(
        depth=raw["depth"],
        num_heads=raw["num_heads"],
        hidden_act=raw.get("hidden_act", "quick_gelu" if family == "qwen2_vl" else "silu"),
        patch_size=raw.get("patch_size", 14),
        temporal_patch_size=raw.get("temporal_patch_size", 2),
        spatial_merge_size=raw.get("spatial_merge_size", 2),
        in_channels=raw.get("in_channels", raw.get("in_chans", 3)),
        rope_theta=rope_theta,
    )
    if family == "qwen2_vl":
        embed = raw["embed_dim"]
        return VisionConfig(
            family=family,
            embed_dim=embed,
            out_dim=raw.get("hidden_size", text_hidden),
            mlp_dim=int(embed * raw.get("mlp_ratio", 4)),
            **common,
        )
    return VisionConfig(
        family=family,
        embed_dim=raw["hidden_size"],
        out_dim=raw.get("out_hidden_size", text_hidden),
        mlp_dim=raw["intermediate_size"],
        window_size=raw.get("window_size", 112),
        tokens_per_second=raw.get("tokens_per_second", 4),  # transformers' default
        fullatt_block_indexes=tuple(raw.get("fullatt_block_indexes", ())),
        **common,
    )


def _parse_text(raw: dict[str, Any], top: dict[str, Any]) -> TextConfig:
    heads = raw["num_attention_heads"]
    rope = _rope(raw)
    head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
    section = tuple(rope.get("mrope_section", (16, 24, 24)))
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {head_dim // 2}")
    if raw.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    return TextConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope["rope_theta"]),
        mrope_section=section,  # type: ignore[arg-type]
        tie_word_embeddings=bool(top.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
    )


def _eos_ids(model_dir: Path, text_raw: dict[str, Any]) -> tuple[int, ...]:
    """Stop tokens: generation_config.json's eos_token_id (chat models list <|im_end|> there)."""
    gen = model_dir / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None
    if eos is None:
        eos = text_raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def load_model_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    architecture = (raw.get("architectures") or [""])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r}; expected one of {SUPPORTED_ARCHITECTURES}"
        )
    family = "qwen2_5_vl" if architecture.startswith("Qwen2_5") else "qwen2_vl"
    text_raw = raw.get("text_config") or raw  # legacy checkpoints keep text fields at top level
    text = _parse_text(text_raw, raw)
    return ModelConfig(
        architecture=architecture,
        text=text,
        vision=_parse_vision(raw["vision_config"], family, text.hidden_size),
        image_token_id=raw.get("image_token_id", 151655),
        video_token_id=raw.get("video_token_id", 151656),
        vision_start_token_id=raw.get("vision_start_token_id", 151652),
        vision_end_token_id=raw.get("vision_end_token_id", 151653),
        eos_token_ids=_eos_ids(model_dir, text_raw),
    )
