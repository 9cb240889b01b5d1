"""The load generator's numbers equal hand-computed ones.

A scripted fake OpenAI server streams on loopback and drives the client's clock: before each chunk it
sets the time the script says, and it pauses (real time) before moving the clock again, so every
timestamp the client records is a scripted value and every derived figure is exact."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from loadgen.arrivals import arrival_offsets
from loadgen.client import Record, Target, run
from loadgen.metrics import SLO, summarize
from loadgen.workloads import PRESETS, Synthetic, WorkloadRequest, synthetic

# Per request: (ttft, gap between tokens, output tokens). Binary fractions keep the sums exact.
SCRIPT = [(0.5, 0.125, 5), (1.0, 0.25, 3), (1.5, 0.0625, 9), (3.0, 0.5, 2)]


class ScriptedClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


async def fake_server(clock: ScriptedClock, script: list[tuple[float, float, int]]):
    order = iter(script)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        body = json.loads(await reader.readexactly(length))
        ttft, gap, tokens = next(order)
        assert body["stream"] and body["max_tokens"] and body["ignore_eos"]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        for k in range(tokens):
            await asyncio.sleep(0.03)  # real time for the client to read the clock before it moves
            clock.t += ttft if k == 0 else gap
            chunk = {"choices": [{"index": 0, "delta": {"content": f"t{k}"}, "finish_reason": None}]}
            writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await writer.drain()
        usage = {
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens},
        }
        writer.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_client_figures_equal_hand_computed_values():
    clock = ScriptedClock()

    async def scenario():
        server = await fake_server(clock, SCRIPT)
        port = server.sockets[0].getsockname()[1]
        requests = [WorkloadRequest(f"q{i}", (), n) for i, (_, _, n) in enumerate(SCRIPT)]
        async with server:
            return await run(
                Target(f"http://127.0.0.1:{port}/v1", "m"),
                requests,
                None,
                concurrency=1,
                progress=False,
                clock=clock,
            )

    records = asyncio.run(scenario())
    assert [r.error for r in records] == [None] * 4
    for r, (ttft, gap, n) in zip(records, SCRIPT, strict=True):
        assert r.first_token - r.arrival == ttft
        assert r.output_tokens == n and len(r.token_times) == n
        assert r.end == r.first_token + gap * (n - 1)
    summary = summarize(records, SLO(ttft_s=1.5, tpot_s=0.25))
    ttfts = [0.5, 1.0, 1.5, 3.0]
    assert summary["ttft_s"]["mean"] == 1.5
    assert summary["ttft_s"]["p50"] == 1.25  # halfway between 1.0 and 1.5
    assert summary["ttft_s"]["p90"] == pytest.approx(float(np.percentile(ttfts, 90)))
    assert summary["ttft_s"]["p90"] == pytest.approx(1.5 + 0.7 * 1.5)  # linear interpolation by hand
    assert summary["tpot_s"]["p50"] == pytest.approx((0.125 + 0.25) / 2)
    assert summary["tpot_s"]["mean"] == pytest.approx((0.125 + 0.25 + 0.0625 + 0.5) / 4)
    # Requests 0, 1, 2 meet TTFT <= 1.5 and TPOT <= 0.25; request 3 misses both.
    assert summary["slo_attainment"] == 0.75
    duration = records[-1].end - records[0].arrival
    expected_duration = sum(t + g * (n - 1) for t, g, n in SCRIPT)
    assert duration == expected_duration == summary["duration_s"]
    assert summary["goodput"] == 3 / expected_duration
    assert summary["request_throughput"] == 4 / expected_duration
    assert summary["output_token_throughput"] == sum(n for *_, n in SCRIPT) / expected_duration


def test_failures_count_against_attainment():
    ok = Record(0, 0.0, first_token=0.5, token_times=[0.5, 0.6], end=0.6, output_tokens=2)
    bad = Record(1, 0.0, error="http_500")
    summary = summarize([ok, bad], SLO(1.0, 1.0))
    assert summary["failures"] == {"http_500": 1} and summary["completed"] == 1
    assert summary["slo_attainment"] == 0.5


@pytest.mark.parametrize(
    ("kind", "burstiness"), [("poisson", 1.0), ("gamma", 0.5), ("gamma", 4.0), ("constant", 1.0)]
)
def test_arrivals_have_the_requested_mean_rate(kind, burstiness):
    offsets = arrival_offsets(4000, rate=4.0, kind=kind, burstiness=burstiness, seed=1)
    gaps = np.diff(offsets)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    cv2 = gaps.var() / gaps.mean() ** 2  # squared coefficient of variation: 1/shape for gamma
    expected = {"poisson": 1.0, "gamma": 1 / burstiness, "constant": 0.0}[kind]
    assert cv2 == pytest.approx(expected, abs=0.15 * max(expected, 1.0))


def test_presets_give_the_requested_images_and_sizes():
    for name, spec in PRESETS.items():
        requests = synthetic(spec, 300, seed=2)
        counts = {len(r.image_sizes) for r in requests}
        assert counts == set(spec.images_per_request), name
        assert all(size in spec.image_sizes for r in requests for size in r.image_sizes)
        assert all(spec.output_tokens[0] <= r.output_tokens <= spec.output_tokens[1] for r in requests)
        seeds = [s for r in requests for s in r.image_seeds]
        assert len(seeds) == len(set(seeds)), "without a repeat ratio every image differs"
    repeated = synthetic(Synthetic((2,), ((224, 224),), (5, 5), (4, 4), repeat_ratio=1.0, pool=3), 50)
    assert {s for r in repeated for s in r.image_seeds} <= {0, 1, 2}
