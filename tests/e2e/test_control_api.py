"""The control plane through a live `epd serve`: the admin API and `epd ctl` against a real server,
a role switch under streaming load (every stream gives the in-process tokens, and a request that
arrives during the switch is served), and `/ready` / 503 when a role has no worker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from loadgen.server import start_server, stop_server
from serving.config import EngineConfig
from serving.engine.llm import LLMEngine
from serving.types import SamplingParams
from tests.e2e.conftest import API_KEY, png_bytes
from tests.e2e.test_bad_inputs import data_url

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def control_server(tiny_model: Path, tmp_path_factory):
    args = ["--model", str(tiny_model), "--api-key", API_KEY, "--decode", "2", "--max-model-len", "2048"]
    args += ["--wait-for-worker", "3"]  # a request with no able worker gets its 503 quickly
    proc, url = start_server(args, tmp_path_factory.mktemp("control") / "serve.log", timeout_s=240)
    yield url
    stop_server(proc)


def ctl(url: str, *argv: str) -> str:
    cmd = [sys.executable, "-m", "serving.cli", "ctl", "--url", url, "--api-key", API_KEY, *argv]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout


def workers(url: str) -> list[dict]:
    return json.loads(ctl(url, "workers", "--json"))["workers"]


def test_admin_api_needs_the_key(control_server):
    response = httpx.get(f"{control_server}/admin/workers")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    bad = httpx.post(f"{control_server}/admin/workers/nobody/switch", json={"roles": "p"}, headers=AUTH)
    assert bad.status_code == 404 and "error" in bad.json()
    wrong = httpx.post(f"{control_server}/admin/workers", json={"roles": "x"}, headers=AUTH)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "roles"


def test_role_switch_under_streaming_load_keeps_every_token(control_server, tiny_model):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=512, block_size=4))
    prompts = [f"Story {i}: once upon a time" for i in range(16)]
    expected = []
    for text in prompts:
        prompt = engine.inputs.from_messages([{"role": "user", "content": text}], [])
        out = engine.generate([(prompt, SamplingParams(max_tokens=40, ignore_eos=True))])[0]
        expected.append(out.text)
    client = openai.OpenAI(base_url=f"{control_server}/v1", api_key=API_KEY, max_retries=0)
    results: dict[int, str] = {}

    def stream(i: int) -> None:
        chunks = client.chat.completions.create(
            model="epd-tiny",
            messages=[{"role": "user", "content": prompts[i]}],
            max_tokens=40,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        results[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    decoder = next(w for w in workers(control_server) if w["roles"] == "d")
    switch = threading.Thread(target=ctl, args=(control_server, "switch", decoder["name"], "--roles", "p"))
    switch.start()
    time.sleep(0.2)
    stream(15)  # arrives while the switch is under way: served all the same
    switch.join()
    for t in threads:
        t.join()
    assert [results[i] for i in range(16)] == expected
    after = {w["name"]: w for w in workers(control_server)}
    assert after[decoder["name"]]["roles"] == "p" and after[decoder["name"]]["phase"] == "active"
    deadline = time.monotonic() + 10
    while any(w["kv_cache_usage"] or w["requests_in_flight"] for w in workers(control_server)):
        assert time.monotonic() < deadline, workers(control_server)
        time.sleep(0.5)  # the monitor refreshes stats every second
    metrics = httpx.get(f"{control_server}/metrics").text
    assert 'epd:role_switches_total{model_name="epd-tiny"} 1.0' in metrics
    ctl(control_server, "switch", decoder["name"], "--roles", "d")


def test_no_worker_for_a_role_is_503_not_an_empty_200(control_server):
    encoders = [w["name"] for w in workers(control_server) if "e" in w["roles"]]
    for name in encoders:
        ctl(control_server, "drain", name)
    try:
        ready = httpx.get(f"{control_server}/ready")
        assert ready.status_code == 503 and "encode" in ready.json()["error"]["message"]
        text_only = httpx.post(
            f"{control_server}/v1/chat/completions",
            headers=AUTH,
            json={"model": "epd-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=120,
        )
        assert text_only.status_code == 200 and text_only.json()["choices"][0]["message"]["content"]
        image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(28, 28))}}
        body = {"model": "epd-tiny", "messages": [{"role": "user", "content": [image]}], "max_tokens": 4}
        for stream in (False, True):
            refused = httpx.post(
                f"{control_server}/v1/chat/completions",
                headers=AUTH,
                json=body | {"stream": stream},
                timeout=60,
            )
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "no_worker_available"
        table = ctl(control_server, "workers")
        assert "e=NO" in table and "draining" in table
    finally:
        for name in encoders:
            ctl(control_server, "resume", name)
    assert httpx.get(f"{control_server}/ready").status_code == 200
