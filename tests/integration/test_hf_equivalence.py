"""Greedy tokens from our engine equal transformers' generate(do_sample=False), token for token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import serving.engine.runner as runner_module
from serving.config import EngineConfig
from serving.engine.inputs import Prompt
from serving.engine.kernels import small_linear
from serving.engine.llm import LLMEngine
from serving.types import SamplingParams
from tests.conftest import make_image

MAX_TOKENS = 24
CASES = {
    "text": [],
    "one-image": [(56, 84)],
    "two-images-different-sizes": [(112, 56), (42, 70)],
    "sides-not-multiple-of-28": [(101, 67)],
}
HF_CLASSES = {
    "tiny_model": Qwen2VLForConditionalGeneration,
    "tiny25_model": Qwen2_5_VLForConditionalGeneration,
}


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def pair(request) -> tuple[LLMEngine, torch.nn.Module]:
    model_dir: Path = request.getfixturevalue(request.param)
    ours = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=256, block_size=8))
    reference = HF_CLASSES[request.param].from_pretrained(model_dir, dtype=torch.float32).eval()
    return ours, reference


def prompt_for(engine: LLMEngine, case: str) -> Prompt:
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(CASES[case])]
    return engine.inputs.from_user_prompt("Describe what you see in detail.", images)


def reference_tokens(model: torch.nn.Module, engine: LLMEngine, prompt: Prompt) -> list[int]:
    ids = torch.tensor([prompt.token_ids])
    kwargs = {}
    if prompt.images:
        kwargs = dict(
            pixel_values=torch.cat([im.pixel_values for im in prompt.images]),
            image_grid_thw=torch.tensor([im.grid_thw for im in prompt.images]),
            mm_token_type_ids=(ids == engine.model_config.image_token_id).int(),
        )
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False, **kwargs
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_tokens_equal_transformers(pair, case):
    engine, reference = pair
    prompt = prompt_for(engine, case)
    ours = engine.generate([(prompt, SamplingParams(max_tokens=MAX_TOKENS))])[0]
    expected = reference_tokens(reference, engine, prompt)
    assert ours.token_ids == expected
    # A random model that alternates between two tokens would make equality prove little.
    assert len(set(expected)) >= 4


@pytest.mark.parametrize("case", ["text", "one-image"])
def test_greedy_tokens_equal_transformers_on_one_thread(pair, case, monkeypatch):
    """As a pinned one-core worker runs: decode steps take the decoder's one C call and the LM head the
    few-row kernel (both counted, so this compares that path and not another)."""
    engine, reference = pair
    fast = engine.runner.model.model.decode_layers
    calls = 0 if fast is None else fast.calls
    rows: list[int] = []
    kernel = small_linear.FewRows.__call__

    def counted(self, x, threads=1):
        rows.append(x.shape[0])
        return kernel(self, x, threads)

    monkeypatch.setattr(small_linear.FewRows, "__call__", counted)
    prompt = prompt_for(engine, case)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = engine.generate([(prompt, SamplingParams(max_tokens=MAX_TOKENS))])[0]
    finally:
        torch.set_num_threads(before)
    assert ours.token_ids == reference_tokens(reference, engine, prompt)
    if small_linear.supported(torch.empty(0)):
        assert rows.count(1) >= MAX_TOKENS - 1
        assert fast is not None and fast.calls - calls >= MAX_TOKENS - 1


def one_d_positions(token_ids, grids, image_token_id, merge, video_token_id=None):
    n = len(token_ids)
    return torch.arange(n).expand(3, n).clone(), 0


def test_negative_control_plain_positions_break_equality(pair, monkeypatch):
    """With 1-D positions instead of M-RoPE the comparison must fail: the test can see a wrong model."""
    engine, reference = pair
    prompt = prompt_for(engine, "two-images-different-sizes")
    expected = reference_tokens(reference, engine, prompt)
    monkeypatch.setattr(runner_module, "mrope_positions", one_d_positions)
    ours = engine.generate([(prompt, SamplingParams(max_tokens=MAX_TOKENS))])[0]
    assert ours.token_ids != expected


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_tokens_equal_transformers_without_the_c_kernels(tiny_model, backend, monkeypatch):
    """The engine with its C kernels off (as with no compiler): every op on its torch path, attention
    and the element-wise steps through the batched torch backend or the Triton kernels (under Triton's
    CPU interpreter here). Three
    prompts in one batch with a small step budget, so prompts are prefilled in chunks after cached
    tokens while the text prompt already decodes: steps mix all three kinds of attention."""
    import os

    from serving.engine import kernels

    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton runs here only under its interpreter")
    monkeypatch.setenv("EPD_CPU_KERNELS", "0")
    monkeypatch.setenv("EPD_ATTENTION_BACKEND", backend)
    # This process's loaded kernels set aside: the engine built now finds none.
    monkeypatch.setattr(kernels, "_libraries", dict.fromkeys(kernels._SOURCES))
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model), num_kv_blocks=64, block_size=32, max_step_tokens=40)
    )
    assert engine.runner.attention.name == backend
    assert engine.runner.model.model.decode_layers is None
    layer = engine.runner.model.model.layers[0]  # the element-wise steps are the backend's too
    assert {m.pointwise.name for m in (layer.input_layernorm, layer.self_attn, layer.mlp)} == {backend}
    reference = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [prompt_for(engine, case) for case in ("text", "one-image", "two-images-different-sizes")]
    assert all(len(p.token_ids) > 40 for p in prompts[1:]), "the image prompts take several steps"
    ours = engine.generate([(p, SamplingParams(max_tokens=12)) for p in prompts])
    for prompt, out in zip(prompts, ours, strict=True):
        assert out.token_ids == reference_tokens(reference, engine, prompt)[:12]
