"""Qwen2-VL video preprocessing: frames resized under a per-frame pixel budget, grouped in pairs
(the temporal patch), normalised and patchified into a (t, h, w) grid.

Follows `transformers`' Qwen2-VL video processor: every frame gets the same smart-resized size, the
frame count is padded to a multiple of the temporal patch by repeating the last frame, and each patch
row holds (channel, time, row, column) in that order, as the image path does for a still frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from serving.engine.image_processor import ImageProcessorConfig, ProcessedImage, smart_resize, to_rgb

# Qwen2-VL's video processor defaults: frames get fewer pixels than still images.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28


def video_config(model_dir: str | Path) -> ImageProcessorConfig:
    """The image processor's settings with the video pixel budget of `video_preprocessor_config.json`
    (or Qwen2-VL's video defaults when the model has none)."""
    base = ImageProcessorConfig.from_dir(model_dir)
    path = Path(model_dir) / "video_preprocessor_config.json"
    raw = json.loads(path.read_text()) if path.exists() else {}
    size = raw.get("size") or {}
    return replace(
        base,
        min_pixels=raw.get("min_pixels") or size.get("shortest_edge") or VIDEO_MIN_PIXELS,
        max_pixels=raw.get("max_pixels") or size.get("longest_edge") or VIDEO_MAX_PIXELS,
    )


@dataclass(frozen=True)
class VideoProcessor:
    cfg: ImageProcessorConfig

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        c = self.cfg
        return smart_resize(height, width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)

    def grid(self, frames: int, width: int, height: int) -> tuple[int, int, int]:
        """The (t, h, w) grid of a clip of this many frames and this size, without decoding it."""
        h, w = self.target_size(width, height)
        tp = self.cfg.temporal_patch_size
        return (-(-frames // tp), h // self.cfg.patch_size, w // self.cfg.patch_size)

    def __call__(self, frames: list[Image.Image]) -> ProcessedImage:
        if not frames:
            raise ValueError("a video needs at least one frame")
        c = self.cfg
        height, width = self.target_size(frames[0].width, frames[0].height)
        mean = np.array(c.image_mean, dtype=np.float32)
        std = np.array(c.image_std, dtype=np.float32)
        resized = [
            np.asarray(to_rgb(f).resize((width, height), resample=Image.Resampling.BICUBIC)) for f in frames
        ]
        tp = c.temporal_patch_size
        resized += [resized[-1]] * (-len(resized) % tp)
        pixels = (np.stack(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
        pixels = ((pixels - mean) / std).transpose(0, 3, 1, 2)  # (T, C, H, W)
        gt, gh, gw = len(resized) // tp, height // c.patch_size, width // c.patch_size
        m, p = c.merge_size, c.patch_size
        patches = pixels.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = np.ascontiguousarray(patches).reshape(gt * gh * gw, 3 * tp * p * p)
        return ProcessedImage(torch.from_numpy(flat), (gt, gh, gw), video=True)
