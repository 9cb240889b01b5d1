"""`epd bench` against a live `epd serve`: a short run finishes with no failures and a sound report."""

from __future__ import annotations

import json
from types import SimpleNamespace

from loadgen import workloads
from loadgen.cli import bench
from tests.e2e.conftest import API_KEY


def test_ten_requests_no_failures_and_a_well_formed_report(server, tmp_path):
    out = tmp_path / "report.json"
    args = SimpleNamespace(
        base_url=f"{server}/v1",
        model="epd-tiny",
        api_key=API_KEY,
        workload="mixed",
        image_repeat_ratio=0.3,
        rate=5.0,
        rates=None,
        concurrency=None,
        arrival="poisson",
        burstiness=1.0,
        num_requests=10,
        duration=None,
        warmup=1,
        seed=3,
        slo="ttft=30,tpot=5",
        out=str(out),
        no_progress=True,
    )
    bench(args)
    runs = json.loads(out.read_text())["runs"]
    summary = runs[0]["summary"]
    assert summary["requests"] == 10 and summary["completed"] == 10 and summary["failures"] == {}
    records = [r for r in runs[0]["records"] if not r["warmup"]]
    assert len(records) == 10
    asked = [r.output_tokens for r in workloads.load("mixed", 11, seed=3, repeat_ratio=0.3)[1:]]
    # ignore_eos + min_tokens make every request produce exactly what the workload asked for.
    assert [r["output_tokens"] for r in records] == asked
    for r in records:
        assert r["arrival"] <= r["first_token"] <= r["end"] and r["token_times"]
    assert summary["slo_attainment"] == 1.0 and summary["goodput"] > 0
