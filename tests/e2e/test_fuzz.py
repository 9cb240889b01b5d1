"""Property-based fuzzing of the live API with hypothesis: request bodies whose every field is either a
plausible value or an arbitrary JSON value (wrong types, bounds, special-token text, odd URLs), plus
arbitrary bytes and content types. No answer may be a 5xx, every error is an OpenAI error object, and
the server answers a normal request afterwards. Bounded for CI: a fixed number of examples, each with
at most 4 output tokens."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.e2e.conftest import API_KEY

MODEL = "epd-tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (10, 200, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
SPECIAL = st.sampled_from(
    ["<|image_pad|>", "<|vision_start|>", "<|im_end|><|im_start|>system\n", "<|endoftext|>", "\x00", "😀"]
)
TEXT = st.one_of(st.text(max_size=40), st.lists(SPECIAL | st.text(max_size=5), max_size=4).map("".join))
URL = st.sampled_from(
    [
        _png(),
        "data:image/png;base64,@@",
        "data:image/gif;base64,R0lGODlhAQABAAAAACw=",
        "http://127.0.0.1:99999/x.png",
        "http://127.0.0.1:abc/x.png",
        "http://[::1/x.png",
        "http://10.0.0.1/x.png",
        "http://169.254.169.254/",
        "ftp://x/y.png",
        "",
    ]
)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": URL})}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), JSON, max_size=2),
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"])},
    optional={"content": st.one_of(TEXT, st.lists(PART, max_size=3), JSON), "name": JSON},
)


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: mostly plausible, sometimes any JSON at all."""
    return st.one_of(plausible, plausible, JSON)


# Every field the server reads or refuses, each optional. max_tokens is always present and never a
# valid large number, so a request that is accepted stays short.
SAMPLING = {
    "temperature": field(st.floats(min_value=0, max_value=2) | st.sampled_from([1e-300, 0, 2.5, -1])),
    "top_p": field(st.floats(min_value=0, max_value=1.5)),
    "top_k": field(st.sampled_from([-2, -1, 0, 1, 50, 2**31 - 1, 2**31, 10**20])),
    "n": field(st.integers(min_value=-1, max_value=20)),
    "seed": field(st.integers(min_value=-5, max_value=2**64)),
    "stop": field(st.one_of(TEXT, st.lists(TEXT, max_size=18))),
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": field(st.booleans()),
    "min_tokens": field(st.integers(min_value=-1, max_value=6)),
    "presence_penalty": field(st.sampled_from([0, 0.5, -3])),
    "frequency_penalty": field(st.sampled_from([0, 1, 5])),
    "logit_bias": field(st.dictionaries(st.text(max_size=3), st.integers(-100, 100), max_size=2)),
    "response_format": field(st.sampled_from([{"type": "text"}, {"type": "json_object"}])),
    "tools": field(st.sampled_from([[], [{"type": "function", "function": {"name": "f"}}]])),
    "tool_choice": field(st.sampled_from(["none", "auto", "required"])),
    "user": field(st.text(max_size=5)),
    "model": st.one_of(st.just(MODEL), st.just(MODEL), JSON),
}
MAX_TOKENS = st.one_of(
    st.integers(min_value=1, max_value=4), st.integers(max_value=0), st.integers(min_value=10**6), JSON
).filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and 4 < v < 10**6))


def body(extra: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    return st.fixed_dictionaries({"max_tokens": MAX_TOKENS}, optional=SAMPLING | extra)


CHAT = body(
    {
        "messages": field(st.lists(MESSAGE, min_size=1, max_size=3)),
        "logprobs": field(st.booleans()),
        "top_logprobs": field(st.integers(min_value=-1, max_value=25)),
    }
).map(lambda b: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} | b)
COMPLETION = body(
    {
        "prompt": field(st.one_of(TEXT, st.lists(TEXT, max_size=4))),
        "logprobs": field(st.integers(min_value=-1, max_value=7)),
        "echo": field(st.booleans()),
        "suffix": field(st.text(max_size=3)),
    }
).map(lambda b: {"model": MODEL, "prompt": "hi"} | b)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=120, headers=AUTH) as client:
        yield client


def check(response: httpx.Response) -> None:
    """No 5xx; errors are OpenAI error objects; streams end with [DONE]."""
    assert response.status_code < 500, response.text[:1000]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "Traceback" not in error["message"] and "pydantic" not in error["message"]
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
        assert '"internal_error"' not in response.text and '"stage_failed"' not in response.text
    else:
        assert response.json()["choices"]


def post(http: httpx.Client, path: str, payload: Any) -> httpx.Response:
    return http.post(path, content=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})


@FUZZ
@given(payload=CHAT)
def test_fuzz_chat(http, payload):
    check(post(http, "/v1/chat/completions", payload))


@FUZZ
@given(payload=COMPLETION)
def test_fuzz_completions(http, payload):
    check(post(http, "/v1/completions", payload))


RAW = st.one_of(
    st.binary(max_size=200), st.text(max_size=200).map(str.encode), JSON.map(json.dumps).map(str.encode)
)


@settings(FUZZ, max_examples=60)
@given(
    raw=RAW,
    kind=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
)  # fmt: skip
def test_fuzz_raw_bodies(http, raw, kind, path):
    check(http.post(path, content=raw, headers={"Content-Type": kind}))


def test_server_is_healthy_after_the_fuzzing(http):
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200
    for path, payload in (
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": MODEL, "prompt": "hi"}),
    ):
        response = post(http, path, payload | {"max_tokens": 3, "temperature": 0})
        assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
