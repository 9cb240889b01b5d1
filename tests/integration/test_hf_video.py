"""Video through our engine equals `transformers` given the same `pixel_values_videos` and
`video_grid_thw`, token for token (greedy), alone and mixed with images in one prompt: Qwen2-VL (one
temporal position per temporal patch) and Qwen2.5-VL (positions spaced by `tokens_per_second` and
the seconds each patch spans, `second_per_grid_ts`)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from serving.config import EngineConfig
from serving.engine.inputs import Prompt
from serving.engine.llm import LLMEngine
from serving.training.batches import hf_media_kwargs
from serving.types import SamplingParams
from tests.conftest import make_image

MAX_TOKENS = 16


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def pair(request, tiny_model, tiny25_model):
    model = tiny_model if request.param == "qwen2_vl" else tiny25_model
    ours = LLMEngine(EngineConfig(model=str(model), num_kv_blocks=256, block_size=8))
    cls = (
        Qwen2VLForConditionalGeneration if request.param == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    )
    reference = cls.from_pretrained(model, dtype=torch.float32).eval()
    return ours, reference


def clip(frames: int, width: int, height: int, seed: int):
    return [make_image(width, height, seed=seed * 100 + i) for i in range(frames)]


def reference_tokens(model, engine: LLMEngine, prompt: Prompt, is_video: list[bool]) -> list[int]:
    cfg = engine.model_config
    ids = torch.tensor([prompt.token_ids])
    kwargs = hf_media_kwargs(ids, prompt.images, is_video, cfg.image_token_id, cfg.video_token_id)
    if cfg.family == "qwen2_5_vl" and any(is_video):
        seconds = prompt.video_seconds + [1.0] * (sum(is_video) - len(prompt.video_seconds))
        kwargs["second_per_grid_ts"] = torch.tensor(seconds)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False, **kwargs
        )
    return out[0, ids.shape[1] :].tolist()


# (media, seconds per temporal patch of each video: [] is the default, 2 frames at 2 fps)
CASES = {
    "video": ([clip(4, 56, 84, 1)], []),
    "odd-frame-count": ([clip(5, 84, 56, 2)], []),
    "image-then-video": ([make_image(56, 56, seed=3), clip(4, 56, 56, 4)], []),
    "video-then-image": ([clip(6, 56, 112, 5), make_image(84, 56, seed=6)], []),
    "sampled-at-8-fps": ([clip(8, 56, 56, 7)], [0.25]),
    "two-videos-at-1-and-0.5-fps": ([clip(4, 56, 56, 8), clip(2, 84, 56, 9)], [2.0, 4.0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_video_greedy_tokens_equal_transformers(pair, case):
    engine, reference = pair
    media, seconds = CASES[case]
    prompt = engine.inputs.from_user_prompt("Describe what happens.", media)
    prompt.video_seconds = list(seconds)
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
