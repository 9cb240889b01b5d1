"""Per-request visual budgets through a live server: `mm_processor_kwargs.max_pixels` changes an
image's token count exactly as Qwen's resize rule says, the same image at two budgets gives two
answers each equal to the engine's on that image, `detail: "low"` gives the low budget, and budgets
outside the model's range are 400s."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from serving.api.budgets import LOW_DETAIL_TOKENS, PixelBudget, detail_budget, fitted_size, request_budget
from serving.engine.image_processor import smart_resize
from serving.stages.decode import resize
from serving.types import SamplingParams
from tests.conftest import make_image
from tests.e2e.conftest import API_KEY, png_bytes
from tests.e2e.test_openai_api import MODEL, data_url

UNIT = 28 * 28


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def ask(client, png: bytes, detail: str | None = None, **extra):
    image = {"url": data_url(png)} | ({"detail": detail} if detail else {})
    content = [{"type": "image_url", "image_url": image}, {"type": "text", "text": "What is it?"}]
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )  # fmt: skip


def image_tokens(response) -> int:
    details = response.usage.prompt_tokens_details
    return getattr(details, "image_tokens", None) or details.model_extra["image_tokens"]


def test_max_pixels_sets_the_token_count_by_qwens_rule(client, engine):
    cfg = engine.inputs.image_processor.cfg
    width, height = 252, 168
    png = png_bytes(width, height, seed=4)
    for tokens in (4, 9, 24, 64):
        response = ask(client, png, mm_processor_kwargs={"max_pixels": tokens * UNIT})
        h, w = smart_resize(height, width, 28, cfg.min_pixels, tokens * UNIT)
        # Rounded below the model's minimum (4 tokens here: 28×56), the model's rule applies again.
        h, w = smart_resize(h, w, 28, cfg.min_pixels, cfg.max_pixels)
        assert image_tokens(response) == h * w // UNIT, tokens


def test_one_image_at_two_budgets_is_two_answers_each_the_engines(client, engine):
    cfg = engine.inputs.image_processor.cfg
    png = png_bytes(252, 168, seed=5)
    picture = np.asarray(make_image(252, 168, seed=5))
    answers = []
    for tokens in (9, 64):
        served = ask(client, png, mm_processor_kwargs={"max_pixels": tokens * UNIT})
        size = fitted_size(*picture.shape[:2], cfg, request_budget(cfg, None, tokens * UNIT))
        resized = resize(picture, size)  # what the encode worker does with the planned size
        prompt = engine.inputs.from_user_prompt("What is it?", [Image.fromarray(resized)])
        want = engine.generate([(prompt, SamplingParams(max_tokens=8, ignore_eos=True))])[0]
        assert served.choices[0].message.content == want.text
        assert served.usage.prompt_tokens == len(prompt.token_ids)
        answers.append(served.usage.prompt_tokens)
    assert answers[0] < answers[1]


def test_detail_low_and_high(client, engine):
    cfg = engine.inputs.image_processor.cfg
    png = png_bytes(252, 168, seed=6)
    low = ask(client, png, detail="low")
    high = ask(client, png, detail="high", mm_processor_kwargs={"max_pixels": 9 * UNIT})
    budget = detail_budget(cfg, "low", PixelBudget(cfg.min_pixels, cfg.max_pixels))
    assert budget.max_pixels == max(min(LOW_DETAIL_TOKENS * UNIT, cfg.max_pixels // 4), cfg.min_pixels)
    h, w = smart_resize(168, 252, 28, cfg.min_pixels, budget.max_pixels)
    assert image_tokens(low) == h * w // UNIT
    h, w = smart_resize(168, 252, 28, cfg.min_pixels, cfg.max_pixels)
    assert image_tokens(high) == h * w // UNIT, "detail high is the model's maximum, whatever the request's"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_pixels": 10**9}, "mm_processor_kwargs.max_pixels"),
        ({"min_pixels": 1}, "mm_processor_kwargs.min_pixels"),
        ({"min_pixels": 40 * UNIT, "max_pixels": 20 * UNIT}, "mm_processor_kwargs.min_pixels"),
        ({"max_pixels": "big"}, "mm_processor_kwargs.max_pixels"),
    ],
)
def test_budgets_outside_the_models_range_are_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, png_bytes(56, 56), mm_processor_kwargs=kwargs)
    assert err.value.body["param"] == param


def pruned_metric(server: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith("epd:visual_tokens_total{")]
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in lines if 'state="pruned"' in line and 'kind="image"' in line
    )


def test_pruning_per_request_keeps_the_computed_count_and_the_engines_answer(server, client, engine):
    """`mm_processor_kwargs.image_pruning_rate`: the usage counts the kept tokens and the pruned ones,
    and the answer is the engine's on the same image pruned the same way; above the server's maximum,
    a 400."""
    picture = make_image(252, 168, seed=8)
    png = png_bytes(252, 168, seed=8)
    plain = ask(client, png)
    whole = image_tokens(plain)
    neutral = ask(client, png, mm_processor_kwargs={"image_pruning_rate": 0})
    assert neutral.choices[0].message.content == plain.choices[0].message.content
    assert neutral.usage == plain.usage, "a rate of 0 is no knob at all"
    for rate in (0.5, 0.75):
        before = pruned_metric(server)
        served = ask(client, png, mm_processor_kwargs={"image_pruning_rate": rate})
        kept = round(whole * (1 - rate))
        assert pruned_metric(server) == before + whole - kept
        assert image_tokens(served) == kept
        assert served.usage.prompt_tokens_details.model_extra["pruned_visual_tokens"] == whole - kept
        prompt = engine.inputs.from_user_prompt("What is it?", [picture], pruning=(rate, 0.0))
        want = engine.generate([(prompt, SamplingParams(max_tokens=8, ignore_eos=True))])[0]
        assert served.choices[0].message.content == want.text
        assert served.usage.prompt_tokens == len(prompt.token_ids)
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, png, mm_processor_kwargs={"image_pruning_rate": 0.95})
    assert err.value.body["param"] == "mm_processor_kwargs.image_pruning_rate"


def p2d_bytes(server: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("epd:transfer_bytes_total{") and 'edge="p2d"' in line
    )


def test_visual_kv_budget_shrinks_the_handoff(server, client):
    """`visual_kv_budget` (a top-level extension field): the P→D handoff of the same request carries
    fewer bytes at 0.25 than whole, 1 is no knob at all, and out of (0, 1] is a 400."""
    png = png_bytes(224, 168, seed=14)
    before = p2d_bytes(server)
    whole = ask(client, png)
    whole_bytes = p2d_bytes(server) - before
    before = p2d_bytes(server)
    compact = ask(client, png, visual_kv_budget=0.25)
    compact_bytes = p2d_bytes(server) - before
    assert compact.usage == whole.usage and len(compact.choices[0].message.content) > 0
    assert 0 < compact_bytes < whole_bytes
    text = httpx.get(f"{server}/metrics", timeout=30).text
    dropped = [
        line
        for line in text.splitlines()
        if line.startswith("epd:visual_kv_tokens_total{") and 'state="dropped"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in dropped) > 0
    one = ask(client, png, visual_kv_budget=1.0)
    assert one.choices[0].message.content == whole.choices[0].message.content
    for bad in (0, 1.5):
        with pytest.raises(openai.BadRequestError) as err:
            ask(client, png, visual_kv_budget=bad)
        assert err.value.body["param"] == "visual_kv_budget"
