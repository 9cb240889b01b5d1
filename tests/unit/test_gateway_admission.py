"""The gateway's admission counts the real work (no Ray: the service over a fake pipeline): fan-out is
refused or queued within the limits, images are admitted before they are fetched, the gauges show
sequences, and errors and disconnects are counted."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import threading
import time
from pathlib import Path
from unittest.mock import AsyncMock, MagicMock

import pytest
from starlette.requests import Request

from serving.api.errors import APIError
from serving.config import GatewayConfig
from serving.gateway.service import GatewayService
from serving.types import FinishReason, TokenDelta


class FakePipeline:
    """Each request waits for `gate`, then finishes with one token."""

    topology = "e+p+d"
    pools: dict = {}

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = 0

    async def run(self, request):
        self.started += 1
        await self.gate.wait()
        yield TokenDelta(request.request_id, [5], "x", FinishReason.LENGTH)


def http_request(path: str, body: dict, content_type: str = "application/json") -> Request:
    raw = json.dumps(body).encode()
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(raw)).encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}
    return Request(scope, receive)


def fake_plane() -> MagicMock:
    """The control plane as the gateway sees it: the fake pipeline, no workers; the rest (control
    metrics, admin) answers whatever a mock answers."""
    plane = MagicMock()
    plane.pipeline = FakePipeline()
    plane.pipeline.counters = MagicMock()
    plane.directory.entries.return_value = []
    plane.ready.return_value = {}
    plane.refresh_stats = AsyncMock(return_value={})
    plane.window = None  # no SLO controller
    plane.gateway_id = "gateway-0"
    plane.control = (0, "")
    plane.replicas = {}  # one gateway
    return plane


def service(tiny_model: Path, **cfg) -> GatewayService:
    return GatewayService(GatewayConfig(**cfg), str(tiny_model), "m", fake_plane(), 2048)


async def scrape(svc: GatewayService) -> dict[str, float]:
    text = (await svc.metrics_text(http_request("/metrics", {}))).body.decode()
    return {
        m.group(1): float(m.group(2)) for m in re.finditer(r"^(epd:\S+?)(?:\{[^}]*\})? (\S+)$", text, re.M)
    }


async def series(svc: GatewayService, name: str, **labels: str) -> float:
    """The value of the series `name` whose labels include `labels` (0 when absent)."""
    text = (await svc.metrics_text(http_request("/metrics", {}))).body.decode()
    for found in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1)))
        if labels.items() <= have.items():
            return float(found.group(2))
    return 0.0


async def errors(svc: GatewayService, error_type: str) -> float:
    return await series(svc, "epd:request_errors_total", error_type=error_type, stage="gateway")


def test_fan_out_beyond_the_per_request_budget_is_refused_before_any_work(tiny_model):
    async def scenario():
        svc = service(tiny_model, max_concurrent_requests=4)
        body = {"model": "m", "prompt": ["hello"] * 64, "n": 16, "max_tokens": 2}
        start = time.perf_counter()
        with pytest.raises(APIError) as err:
            await svc.completions(http_request("/v1/completions", body))
        assert err.value.status == 400 and err.value.code == "too_many_sequences"
        assert time.perf_counter() - start < 1.0 and svc.pipeline.started == 0
        assert await errors(svc, "invalid_request") == 1

    asyncio.run(scenario())


def test_sequences_are_admitted_and_shown_not_requests(tiny_model):
    """max_concurrent 4: a request of 2 prompts × n=2 takes all four slots; the next one queues."""

    async def scenario():
        svc = service(tiny_model, max_concurrent_requests=4)
        body = {"model": "m", "prompt": ["a", "b"], "n": 2, "max_tokens": 2}
        first = asyncio.create_task(svc.completions(http_request("/v1/completions", body)))
        await asyncio.sleep(0.3)
        second = asyncio.create_task(svc.completions(http_request("/v1/completions", body | {"n": 1})))
        await asyncio.sleep(0.3)
        gauges = await scrape(svc)
        assert gauges["epd:num_requests_running"] == 1 and gauges["epd:num_sequences_running"] == 4
        assert gauges["epd:num_requests_waiting"] == 1 and svc.pipeline.started == 4
        svc.pipeline.gate.set()
        answers = await asyncio.gather(first, second)
        assert [len(json.loads(a.body)["choices"]) for a in answers] == [4, 2]
        gauges = await scrape(svc)
        assert gauges["epd:num_sequences_running"] == 0 and gauges["epd:num_requests_running"] == 0

    asyncio.run(scenario())


def test_a_request_larger_than_max_concurrent_runs_alone(tiny_model):
    async def scenario():
        svc = service(tiny_model, max_concurrent_requests=4, max_sequences_per_request=64)
        svc.pipeline.gate.set()
        body = {"model": "m", "prompt": ["a"] * 8, "n": 8, "max_tokens": 1}
        answer = await svc.completions(http_request("/v1/completions", body))
        assert len(json.loads(answer.body)["choices"]) == 64

    asyncio.run(scenario())


def test_token_budget_counts_prompts_times_n(tiny_model):
    async def scenario():
        svc = service(tiny_model, max_request_tokens=100)
        body = {"model": "m", "prompt": "word " * 30, "n": 4, "max_tokens": 1}
        with pytest.raises(APIError) as err:
            await svc.completions(http_request("/v1/completions", body))
        assert err.value.code == "request_too_large"

    asyncio.run(scenario())


class _Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        time.sleep(5)

    def log_message(self, *args) -> None:
        pass


def test_slow_image_host_holds_admission_slots_and_meets_the_deadline(tiny_model):
    """12 requests with an image on a slow allowlisted host, max_concurrent 4 and max_queued 4: four
    are admitted before their fetch, four wait, four get 429 at once; all fetches end at the deadline."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/slow.png"

    async def scenario():
        svc = service(
            tiny_model, max_concurrent_requests=4, max_queued_requests=4,
            allow_media_hosts=("127.0.0.1",), media_total_timeout_s=0.5,
        )  # fmt: skip
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]
        body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
        start = time.perf_counter()
        tasks = [
            asyncio.create_task(svc.chat_completions(http_request("/v1/chat/completions", body)))
            for _ in range(12)
        ]
        await asyncio.sleep(0.2)
        gauges = await scrape(svc)
        assert gauges["epd:num_requests_running"] == 4 and gauges["epd:num_requests_waiting"] == 4
        results = await asyncio.gather(*tasks, return_exceptions=True)
        statuses = sorted(r.status for r in results)
        assert statuses == [422] * 8 + [429] * 4
        assert time.perf_counter() - start < 3.0  # two rounds of a 0.5 s deadline, not 12 × 5 s
        assert await errors(svc, "rate_limited") == 4
        await svc.media.close()

    try:
        asyncio.run(scenario())
    finally:
        httpd.shutdown()


def test_client_disconnect_counts_an_abort(tiny_model):
    async def scenario():
        svc = service(tiny_model)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 2}
        task = asyncio.create_task(svc.chat_completions(http_request("/v1/chat/completions", body)))
        await asyncio.sleep(0.3)
        task.cancel()  # what either HTTP server does when the client goes away (CancelOnDisconnect)
        await asyncio.gather(task, return_exceptions=True)
        assert await series(svc, "epd:request_success_total", finished_reason="abort") == 2  # both choices
        assert (await scrape(svc))["epd:num_sequences_running"] == 0

    asyncio.run(scenario())


def test_wrong_content_type_is_415_and_counted(tiny_model):
    async def scenario():
        svc = service(tiny_model)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for kind in ("text/plain", "application/x-www-form-urlencoded", "", "application/jsonx"):
            with pytest.raises(APIError) as err:
                await svc.chat_completions(http_request("/v1/chat/completions", body, kind))
            assert err.value.status == 415
        assert await errors(svc, "invalid_request") == 4

    asyncio.run(scenario())
