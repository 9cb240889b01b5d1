"""The SLO controller in a live `epd serve --controller on`: a load whose mix shifts from text-only to
image-heavy makes it move a worker towards encode; the move shows in `epd ctl workers`, `epd ctl
decisions` and `/metrics`, and no request fails on the way."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from loadgen.client import Record, Target, run
from loadgen.server import start_server, stop_server
from loadgen.workloads import WorkloadRequest
from loadgen.workloads import load as load_workload
from tests.e2e.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def controlled_server(tiny_model: Path, tmp_path_factory):
    args = ["--model", str(tiny_model), "--api-key", API_KEY, "--decode", "2", "--max-model-len", "2048"]
    args += ["--controller", "on", "--controller-tick", "1", "--controller-window", "8"]
    args += ["--controller-cooldown", "3", "--slo-ttft", "1", "--slo-tpot", "1"]
    proc, url = start_server(args, tmp_path_factory.mktemp("controller") / "serve.log", timeout_s=240)
    yield url
    stop_server(proc)


def ctl(url: str, *argv: str) -> str:
    cmd = [sys.executable, "-m", "serving.cli", "ctl", "--url", url, "--api-key", API_KEY, *argv]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


def decisions(url: str) -> list[dict]:
    return httpx.get(f"{url}/admin/decisions", headers=AUTH, timeout=30).json()["decisions"]


def load(url: str, requests: list[WorkloadRequest], concurrency: int) -> list[Record]:
    target = Target(f"{url}/v1", "epd-tiny", API_KEY)
    return asyncio.run(run(target, requests, None, concurrency, progress=False))


def image_burst(n: int) -> list[WorkloadRequest]:
    """Requests whose work is nearly all encode: eight large images, a few output tokens."""
    sizes = ((448, 448),) * 8
    return [
        WorkloadRequest(f"describe these pictures {i}", sizes, 8, tuple(range(i * 8, i * 8 + 8)))
        for i in range(n)
    ]


def test_a_shift_to_images_moves_a_worker_towards_encode(controlled_server):
    url = controlled_server
    assert httpx.get(f"{url}/admin/decisions", timeout=30).status_code == 401  # behind the key
    text = load(url, load_workload("text", 24, seed=3), concurrency=4)
    assert all(r.error is None for r in text)
    assert decisions(url) == []  # a load that meets the SLO is left alone

    done = threading.Event()
    records: list[Record] = []

    def drive() -> None:
        while not done.is_set():
            records.extend(load(url, image_burst(24), concurrency=8))

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    moved: list[dict] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and not moved:
            moved = [d for d in decisions(url) if d["kind"] == "switch" and d["outcome"] == "done"]
            time.sleep(1)
    finally:
        done.set()
        driver.join(timeout=300)
    assert moved, decisions(url)
    first = moved[0]
    assert "e" in first["roles"] and first["mode"] == "on" and first["applied"]
    assert "encode" in first["reason"]

    pool = json.loads(ctl(url, "workers", "--json"))["workers"]
    assert next(w for w in pool if w["name"] == first["worker"])["roles"] == first["roles"]
    assert sum("e" in w["roles"] for w in pool) == 2
    shown = ctl(url, "decisions")
    assert first["worker"] in shown and "switch" in shown

    metrics = samples(httpx.get(f"{url}/metrics", timeout=30).text)
    applied = metrics[
        ("epd:controller_decisions_total", (("action", "switch"), ("applied", "true"), ("mode", "on")))
    ]
    assert applied >= 1
    assert metrics[("epd:controller_mode", (("mode", "on"),))] == 1
    # Nothing failed: every request of both phases was answered, none with an error.
    assert records and all(r.error is None for r in records), [r.error for r in records if r.error]
    assert metrics[("epd:request_success_total", (("finished_reason", "error"),))] == 0


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels but the model's)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out
