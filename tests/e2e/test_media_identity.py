"""Media identity (vLLM's per-part `uuid`) through a live server: a part sent with data and a uuid
is remembered; a later part with the uuid alone gets the same answer with no fetch, no decode and no
encode (counted in /metrics); an unknown uuid is a 400; a video's uuid is remembered per sampling."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.e2e import videos
from tests.e2e.conftest import API_KEY, png_bytes
from tests.e2e.test_openai_api import MODEL, data_url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def metric(server: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def ask(client, part: dict, **extra) -> str:
    content = [part, {"type": "text", "text": "What is it?"}]
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )  # fmt: skip
    return response.choices[0].message.content


def test_a_uuid_alone_reuses_the_image_without_decoding_or_encoding_it(server, client):
    png = png_bytes(84, 56, seed=21)
    before = metric(server, "epd:worker_media_decoded_total", kind="image")
    first = ask(client, {"type": "image_url", "image_url": {"url": data_url(png)}, "uuid": "photo-21"})
    decoded = metric(server, "epd:worker_media_decoded_total", kind="image")
    assert decoded == before + 1, "decoded once, on the encode worker"
    assert metric(server, "epd:media_decoded_total", kind="image") == 0, "never on the gateway"
    hits = metric(server, "epd:media_uuid_hits_total")
    encode_hits = metric(server, "epd:mm_cache_hits_total")
    again = ask(client, {"type": "image_url", "uuid": "photo-21"})
    assert again == first
    assert metric(server, "epd:worker_media_decoded_total", kind="image") == decoded, "not decoded again"
    assert metric(server, "epd:media_uuid_hits_total") == hits + 1
    assert metric(server, "epd:mm_cache_hits_total") == encode_hits + 1, "its embeddings came from the cache"


def test_an_unknown_uuid_is_a_400_and_the_server_goes_on(client):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, {"type": "image_url", "uuid": "never-sent"})
    assert err.value.body["code"] == "unknown_media_uuid"
    assert err.value.body["param"] == "messages.0.content.0.image_url"
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, {"type": "image_url"})  # neither data nor a uuid
    assert err.value.body["code"] == "invalid_value"
    assert ask(client, {"type": "image_url", "image_url": {"url": data_url(png_bytes(28, 28))}})


def test_a_video_uuid_is_remembered_per_sampling(server, client):
    clip = videos.clip(frames=8, size=(56, 42))
    part = {"type": "video_url", "video_url": {"url": videos.data_url(clip)}, "uuid": "clip-1"}
    four = {"media_io_kwargs": {"video": {"num_frames": 4}}}
    first = ask(client, part, **four)
    decoded = metric(server, "epd:worker_media_decoded_total", kind="video")
    assert ask(client, {"type": "video_url", "uuid": "clip-1"}, **four) == first
    assert metric(server, "epd:worker_media_decoded_total", kind="video") == decoded
    with pytest.raises(openai.BadRequestError) as err:  # other frames: not what was remembered
        ask(client, {"type": "video_url", "uuid": "clip-1"}, media_io_kwargs={"video": {"num_frames": 2}})
    assert err.value.body["code"] == "unknown_media_uuid"
    assert re.fullmatch(r"messages\.0\.content\.0\.video_url", err.value.body["param"])
