"""Video through our engine equals `transformers`' Qwen2-VL given the same `pixel_values_videos` and
`video_grid_thw`, token for token (greedy), alone and mixed with images in one prompt."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from serving.config import EngineConfig
from serving.engine.inputs import Prompt
from serving.engine.llm import LLMEngine
from serving.training.batches import hf_media_kwargs
from serving.types import SamplingParams
from tests.conftest import make_image

MAX_TOKENS = 16


@pytest.fixture(scope="module")
def pair(tiny_model):
    ours = LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=256, block_size=8))
    reference = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return ours, reference


def clip(frames: int, width: int, height: int, seed: int):
    return [make_image(width, height, seed=seed * 100 + i) for i in range(frames)]


def reference_tokens(model, engine: LLMEngine, prompt: Prompt, is_video: list[bool]) -> list[int]:
    cfg = engine.model_config
    ids = torch.tensor([prompt.token_ids])
    kwargs = hf_media_kwargs(ids, prompt.images, is_video, cfg.image_token_id, cfg.video_token_id)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False, **kwargs
        )
    return out[0, ids.shape[1] :].tolist()


CASES = {
    "video": [clip(4, 56, 84, 1)],
    "odd-frame-count": [clip(5, 84, 56, 2)],
    "image-then-video": [make_image(56, 56, seed=3), clip(4, 56, 56, 4)],
    "video-then-image": [clip(6, 56, 112, 5), make_image(84, 56, seed=6)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_video_greedy_tokens_equal_transformers(pair, case):
    engine, reference = pair
    media = CASES[case]
    prompt = engine.inputs.from_user_prompt("Describe what happens.", media)
    is_video = [isinstance(m, list) for m in media]
    ours = engine.generate([(prompt, SamplingParams(max_tokens=MAX_TOKENS))])[0]
    expected = reference_tokens(reference, engine, prompt, is_video)
    assert ours.token_ids == expected
    assert len(set(expected)) >= 4


def test_video_pads_are_not_image_pads(pair):
    """The same frame as a video and as an image: video pads for the one, image pads for the other."""
    engine, _ = pair
    frame = make_image(56, 56, seed=9)
    as_video = engine.inputs.from_user_prompt("What is it?", [[frame, frame]])
    as_image = engine.inputs.from_user_prompt("What is it?", [frame])
    cfg = engine.model_config
    assert cfg.video_token_id in as_video.token_ids and cfg.image_token_id not in as_video.token_ids
    assert cfg.image_token_id in as_image.token_ids and cfg.video_token_id not in as_image.token_ids


def test_video_on_qwen25_is_refused(tiny25_model):
    engine = LLMEngine(EngineConfig(model=str(tiny25_model), num_kv_blocks=64, block_size=8))
    with pytest.raises(ValueError, match="Qwen2-VL models only"):
        engine.inputs.from_user_prompt("x", [clip(2, 56, 56, 1)])
