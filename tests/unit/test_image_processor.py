"""Our preprocessing equals transformers' Qwen2VLImageProcessorPil: same pixels, same grids."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from serving.engine.image_processor import ImageProcessor, ImageProcessorConfig, smart_resize
from tests.conftest import make_image

CASES = [
    (56, 84, "RGB"),  # multiples of 28
    (100, 61, "RGB"),  # not multiples of 28
    (13, 9, "RGB"),  # below min_pixels: scaled up
    (1000, 700, "RGB"),  # above max_pixels: scaled down
    (300, 20, "RGB"),  # long and thin
    (64, 64, "RGBA"),  # alpha composited onto white
    (70, 50, "L"),  # greyscale
]


@pytest.mark.parametrize(("width", "height", "mode"), CASES)
def test_pixels_and_grid_equal_reference(tiny_model, width, height, mode):
    ours = ImageProcessor(ImageProcessorConfig.from_dir(tiny_model))
    cfg = ours.cfg
    ref = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    image = make_image(width, height, seed=width, mode=mode)
    if mode == "RGBA":
        alpha = np.linspace(0, 255, width * height, dtype=np.uint8).reshape(height, width)
        image.putalpha(Image.fromarray(alpha))
    expected = ref(images=[image], return_tensors="np")
    got = ours(image)
    assert got.grid_thw == tuple(expected["image_grid_thw"][0].tolist())
    assert got.pixel_values.shape == expected["pixel_values"].shape
    assert np.array_equal(got.pixel_values.numpy(), expected["pixel_values"])


def test_smart_resize_bounds():
    h, w = smart_resize(2000, 3000, 28, 56 * 56, 28 * 28 * 64)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 64
    h, w = smart_resize(1, 1, 28, 56 * 56, 28 * 28 * 64)
    assert h * w >= 56 * 56
    with pytest.raises(ValueError):
        smart_resize(1, 500, 28, 56 * 56, 28 * 28 * 64)
