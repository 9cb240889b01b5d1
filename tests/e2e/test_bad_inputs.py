"""Bad input gets a clear OpenAI error object with the right status, leaks nothing, and the server
keeps serving: after the whole table a good request still succeeds."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import API_KEY, png_bytes

MODEL = "epd-tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def data_url(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def image_message(url: str, text: str = "what is it?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def chat_body(**overrides) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    body.update(overrides)
    return body


def bomb_png() -> bytes:
    """A small file that decodes to 64 million pixels."""
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(width: int, height: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


TRUNCATED = png_bytes(64, 64)[:200]
CASES = [
    # (name, method, path, body or raw bytes, headers, expected status, expected code or None)
    ("malformed json", "POST", "/v1/chat/completions", b'{"model": "epd-tiny", "messages": [', AUTH, 400, "invalid_json"),
    ("json array body", "POST", "/v1/chat/completions", b"[1, 2]", AUTH, 400, "invalid_json"),
    ("no messages", "POST", "/v1/chat/completions", {"model": MODEL}, AUTH, 400, None),
    ("empty messages", "POST", "/v1/chat/completions", chat_body(messages=[]), AUTH, 400, None),
    ("bad role", "POST", "/v1/chat/completions", chat_body(messages=[{"role": "robot", "content": "x"}]), AUTH, 400, None),
    ("unknown part type", "POST", "/v1/chat/completions",
     chat_body(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), AUTH, 400, None),
    ("bad base64", "POST", "/v1/chat/completions", chat_body(messages=image_message("data:image/png;base64,@@@not-base64")), AUTH, 400, "invalid_image"),
    ("not an image", "POST", "/v1/chat/completions", chat_body(messages=image_message(data_url(b"hello, I am text"))), AUTH, 400, "invalid_image"),
    ("truncated png", "POST", "/v1/chat/completions", chat_body(messages=image_message(data_url(TRUNCATED))), AUTH, 400, "invalid_image"),
    ("decompression bomb", "POST", "/v1/chat/completions", chat_body(messages=image_message(data_url(bomb_png()))), AUTH, 400, "image_too_large"),
    ("extreme aspect ratio", "POST", "/v1/chat/completions", chat_body(messages=image_message(data_url(image_bytes(1, 400, "PNG")))), AUTH, 400, "invalid_image"),
    ("too many images", "POST", "/v1/chat/completions",
     chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(28, 28))}}] * 9}]),
     AUTH, 400, "too_many_images"),
    ("ftp image url", "POST", "/v1/chat/completions", chat_body(messages=image_message("ftp://example.invalid/x.png")), AUTH, 400, "invalid_image_url"),
    ("unknown model", "POST", "/v1/chat/completions", chat_body(model="gpt-17"), AUTH, 404, "model_not_found"),
    ("negative max_tokens", "POST", "/v1/chat/completions", chat_body(max_tokens=-3), AUTH, 400, None),
    ("temperature out of range", "POST", "/v1/chat/completions", chat_body(temperature=7), AUTH, 400, None),
    ("top_p zero", "POST", "/v1/chat/completions", chat_body(top_p=0), AUTH, 400, None),
    ("n zero", "POST", "/v1/chat/completions", chat_body(n=0), AUTH, 400, None),
    ("empty stop string", "POST", "/v1/chat/completions", chat_body(stop=[""]), AUTH, 400, None),
    ("context too long", "POST", "/v1/chat/completions", chat_body(max_tokens=10**6), AUTH, 400, "context_length_exceeded"),
    ("top_logprobs too many", "POST", "/v1/chat/completions", chat_body(logprobs=True, top_logprobs=50), AUTH, 400, None),
    ("oversized body", "POST", "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "x" * (3 * 2**20)}]), AUTH, 413, "body_too_large"),
    ("missing api key", "POST", "/v1/chat/completions", chat_body(), {}, 401, "invalid_api_key"),
    ("wrong api key", "POST", "/v1/chat/completions", chat_body(), {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("completions echo", "POST", "/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, AUTH, 400, None),
    ("completions empty prompt", "POST", "/v1/completions", {"model": MODEL, "prompt": ""}, AUTH, 400, None),
    ("unknown route", "GET", "/v1/nothing-here", None, AUTH, 404, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "headers", "status", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_gets_an_openai_error(server, tiny_model, name, method, path, body, headers, status, code):
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    response = httpx.request(method, f"{server}{path}", content=content,
                             headers={"Content-Type": "application/json", **headers}, timeout=60)  # fmt: skip
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    for leak in ("Traceback", 'File "', str(tiny_model), "/work", "/tmp", "0x"):
        assert leak not in error["message"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_formats_and_tiny_images_are_served(server, fmt):
    for size in ((1, 1), (300, 3)):
        raw = image_bytes(*size, fmt)
        body = chat_body(messages=image_message(data_url(raw, fmt.lower())))
        response = httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        assert response.status_code == 200, (fmt, size, response.text)


def test_good_request_still_succeeds_after_the_table(server):
    response = httpx.post(f"{server}/v1/chat/completions", json=chat_body(), headers=AUTH, timeout=60)
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert httpx.get(f"{server}/ready", timeout=30).status_code == 200
