"""Shared fixtures: tiny models built once per session, deterministic test images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serving.config import EngineConfig
from serving.engine.llm import LLMEngine
from serving.engine.models.builder import build_model

# Without a GPU, Triton kernels run under Triton's CPU interpreter (the attention backend's tests). It
# is read when Triton is imported, so it is set before any test can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "epd-tiny", "tiny")


@pytest.fixture(scope="session")
def tiny25_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("models") / "epd-tiny-25", "tiny", family="qwen2_5_vl")


@pytest.fixture(scope="session")
def engine(tiny_model: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=512, block_size=4))


@pytest.fixture
def one_thread():
    """As a pinned one-core worker runs: one intra-op thread (the C kernels take inputs of any size)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image.convert(mode) if mode != "RGB" else image
