"""The official openai client against a live `epd serve`: chat with images (inline and fetched),
streaming, completions, models, usage; the output equals `epd generate`; concurrency; disconnects."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import subprocess
import sys

import httpx
import openai
import pytest
from PIL import Image

from serving.telemetry.metrics import CATALOG
from serving.types import SamplingParams
from tests.conftest import make_image
from tests.e2e.conftest import API_KEY, png_bytes

MODEL = "epd-tiny"


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client, content, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=12, **kw
    )


def streamed_text(client, content, **kw) -> tuple[str, object]:
    stream = chat(client, content, stream=True, stream_options={"include_usage": True}, **kw)
    text, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["length"]
    return "".join(text), usage


def expected(engine, images, text, max_tokens=12):
    prompt = engine.inputs.from_user_prompt(text, images)
    return prompt, engine.generate([(prompt, SamplingParams(max_tokens=max_tokens))])[0]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


@pytest.mark.parametrize(
    "sizes", [[], [(56, 84)], [(70, 42), (28, 56)]], ids=["text", "one-image", "two-images"]
)
def test_chat_matches_engine_and_stream_matches_non_stream(client, engine, sizes):
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    content = [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(w, h, i))}}
        for i, (w, h) in enumerate(sizes)
    ]
    content.append({"type": "text", "text": "What do you see?"})
    prompt, want = expected(engine, images, "What do you see?")
    response = chat(client, content)
    assert response.choices[0].message.content == want.text
    assert response.choices[0].finish_reason == "length"
    usage = response.usage
    assert usage.prompt_tokens == len(prompt.token_ids) and usage.completion_tokens == len(want.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    image_tokens = sum(engine.model_config.num_image_tokens(g) for g in prompt.grids)
    assert usage.prompt_tokens_details.model_extra.get("image_tokens", None) == image_tokens or (
        getattr(usage.prompt_tokens_details, "image_tokens", None) == image_tokens
    )
    text, stream_usage = streamed_text(client, content)
    assert text == response.choices[0].message.content
    assert stream_usage.completion_tokens == usage.completion_tokens


def test_chat_equals_epd_generate(client, tiny_model, tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(png_bytes(60, 45, seed=3))
    cli = subprocess.run(
        [sys.executable, "-m", "serving.cli", "generate", "--model", str(tiny_model), "--prompt", "Tell me.",
         "--image", str(path), "--max-tokens", "12", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    want = json.loads(cli.stdout.strip().splitlines()[-1])
    content = [{"type": "image_url", "image_url": {"url": data_url(path.read_bytes())}},
               {"type": "text", "text": "Tell me."}]  # fmt: skip
    assert chat(client, content).choices[0].message.content == want["text"]


def test_completions(client, engine):
    response = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    tokens = engine.tokenizer.encode("The sky is")
    from serving.engine.inputs import Prompt

    want = engine.generate([(Prompt(tokens), SamplingParams(max_tokens=8))])[0]
    assert response.choices[0].text == want.text
    assert response.usage.prompt_tokens == len(tokens) and response.usage.completion_tokens == 8


def test_image_from_allowlisted_http_url(client, engine, image_server):
    base, png = image_server
    image = Image.open(io.BytesIO(png))
    _, want = expected(engine, [image], "Describe.")
    content = [{"type": "image_url", "image_url": {"url": f"{base}/img.png", "detail": "high"}},
               {"type": "text", "text": "Describe."}]  # fmt: skip
    assert chat(client, content).choices[0].message.content == want.text


@pytest.mark.parametrize("path", ["localhost-direct", "/redirect-private"])
def test_private_addresses_refused(client, image_server, path):
    base, _ = image_server
    port = base.rsplit(":", 1)[1]
    url = f"http://localhost:{port}/img.png" if path == "localhost-direct" else f"{base}{path}"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        chat(client, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}])
    assert err.value.body["code"] == "media_address_blocked"


def test_thirty_two_concurrent_streams_complete(server, engine):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Question {i}"}], temperature=0,
            max_tokens=6 + i % 4, stream=True,
        )  # fmt: skip
        text, reason = [], None
        async for chunk in stream:
            for c in chunk.choices:
                text.append(c.delta.content or "")
                reason = c.finish_reason or reason
        return "".join(text), reason

    async def run_all():
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run_all())
    for i, (text, reason) in enumerate(results):
        prompt = engine.inputs.from_messages([{"role": "user", "content": f"Question {i}"}], [])
        want = engine.generate([(prompt, SamplingParams(max_tokens=6 + i % 4))])[0]
        assert (text, reason) == (want.text, str(want.finish_reason)), i


def kv_usage(server) -> dict[str, float]:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'epd:kv_cache_usage_perc\{[^}]*worker="([^"]+)"\} (\S+)', text)
    }


def test_metrics_show_the_whole_catalog_with_stage_histograms(server, client):
    chat(client, [{"type": "image_url", "image_url": {"url": data_url(png_bytes(40, 40, 5))}},
                  {"type": "text", "text": "x"}])  # fmt: skip
    text = httpx.get(f"{server}/metrics", timeout=30).text
    # A sample line, not just the `# HELP` line a family without children still prints.
    sampled = {m.group(1) for m in re.finditer(r"^([a-z0-9_:]+?)(?:_bucket|_count|_sum)?[{ ]", text, re.M)}
    missing = [name for name in CATALOG if name not in sampled]
    assert not missing, missing
    for stage in ("encode", "prefill", "decode", "e2p_transfer", "p2d_transfer"):
        count = re.search(rf'epd:stage_duration_seconds_count\{{[^}}]*stage="{stage}"[^}}]*\}} (\S+)', text)
        assert count and float(count.group(1)) > 0, stage
    assert float(re.search(r"epd:slo_requests_total\{[^}]*\} (\S+)", text).group(1)) > 0


def prefix_hit_tokens(server) -> float:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r"^epd:prefix_cache_hits_total\{[^}]*\} (\S+)", text, re.M))


def test_a_repeated_prompt_reuses_its_cached_prefix_and_answers_alike(server, client, engine):
    """The same image and long text twice through E→P→D: the second prefill starts after the cached
    prefix (hits counted on /metrics), and both answers equal the in-process engine's."""
    text = "Describe every part of this picture in detail, " * 12
    image = make_image(70, 56, seed=11)
    content = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(70, 56, 11))}},
               {"type": "text", "text": text}]  # fmt: skip
    _, want = expected(engine, [image], text)
    before = prefix_hit_tokens(server)
    first = chat(client, content).choices[0].message.content
    after_first = prefix_hit_tokens(server)
    second = chat(client, content).choices[0].message.content
    assert first == second == want.text
    # A prompt of ~150 tokens shares at least its leading full blocks (image included) the second time.
    assert prefix_hit_tokens(server) - after_first >= 64, (before, after_first)
