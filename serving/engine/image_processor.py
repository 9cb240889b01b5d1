"""Qwen2-VL image preprocessing: smart resize, RGB, rescale and normalise, patchify into a grid.

Matches `transformers`' Qwen2VLImageProcessorPil bit for bit (PIL bicubic resize of the uint8 image,
float64 rescale, float32 normalisation) without torchvision.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision tower: flattened patches and their (t, h, w) grid."""

    pixel_values: torch.Tensor  # (t*h*w, C * temporal_patch * patch * patch) float32
    grid_thw: tuple[int, int, int]
    video: bool = False


@dataclass(frozen=True)
class ImageProcessorConfig:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ImageProcessorConfig:
        path = Path(model_dir) / "preprocessor_config.json"
        raw = json.loads(path.read_text()) if path.exists() else {}
        size = raw.get("size") or {}
        return cls(
            patch_size=raw.get("patch_size", 14),
            temporal_patch_size=raw.get("temporal_patch_size", 2),
            merge_size=raw.get("merge_size", 2),
            min_pixels=raw.get("min_pixels") or size.get("shortest_edge") or 56 * 56,
            max_pixels=raw.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280,
            image_mean=tuple(raw.get("image_mean", CLIP_MEAN)),
            image_std=tuple(raw.get("image_std", CLIP_STD)),
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Sides that are multiples of `factor`, keep the aspect ratio, and fit the pixel budget."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError("image aspect ratio must be smaller than 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageProcessor:
    def __init__(self, cfg: ImageProcessorConfig) -> None:
        self.cfg = cfg
        self._mean = np.array(cfg.image_mean, dtype=np.float32)
        self._std = np.array(cfg.image_std, dtype=np.float32)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) the image is resized to; cheap, so callers can check budgets first."""
        c = self.cfg
        return smart_resize(height, width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """The (t, h, w) patch grid an image of this size becomes, without touching its pixels."""
        h, w = self.target_size(width, height)
        return (1, h // self.cfg.patch_size, w // self.cfg.patch_size)

    def __call__(self, image: Image.Image) -> ProcessedImage:
        c = self.cfg
        rgb = to_rgb(image)
        height, width = self.target_size(rgb.width, rgb.height)
        resized = np.asarray(rgb.resize((width, height), resample=Image.Resampling.BICUBIC))
        pixels = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        pixels = ((pixels - self._mean) / self._std).transpose(2, 0, 1)  # (C, H, W)
        gh, gw = height // c.patch_size, width // c.patch_size
        m, p = c.merge_size, c.patch_size
        patches = pixels.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        # A still image fills both temporal slots of the patch with the same frame.
        patches = np.broadcast_to(
            patches[:, :, :, :, :, None], (*patches.shape[:5], c.temporal_patch_size, p, p)
        )
        flat = np.ascontiguousarray(patches).reshape(gh * gw, 3 * c.temporal_patch_size * p * p)
        return ProcessedImage(torch.from_numpy(flat), (1, gh, gw))
