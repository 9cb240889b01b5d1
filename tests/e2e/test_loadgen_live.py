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
        mm_bucket=None,
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


def test_video_and_mixed_buckets_count_visual_tokens(server, tmp_path):
    """`--workload video` and `--mm-bucket` (an image bucket and a video bucket): every request served,
    and the report counts the visual tokens the server said it ran, video tokens apart."""
    out = tmp_path / "video.json"
    base = dict(
        base_url=f"{server}/v1", model="epd-tiny", api_key=API_KEY, image_repeat_ratio=None, rate=None,
        rates=None, concurrency=2, arrival="poisson", burstiness=1.0, num_requests=4, duration=None,
        warmup=0, seed=1, slo="ttft=30,tpot=5", out=str(out), no_progress=True,
    )  # fmt: skip
    bench(SimpleNamespace(**base, workload="video", mm_bucket=None))
    summary = json.loads(out.read_text())["runs"][0]["summary"]
    assert summary["completed"] == 4 and summary["failures"] == {}
    assert summary["video_tokens"] == summary["visual_tokens"] > 0
    buckets = '{"56x56x1": 0.5, "56x42x4": 0.5}'
    bench(SimpleNamespace(**base, workload="image-heavy", mm_bucket=buckets))
    run = json.loads(out.read_text())["runs"][0]
    summary = run["summary"]
    assert summary["completed"] == 4 and summary["failures"] == {}
    assert 0 < summary["video_tokens"] < summary["visual_tokens"], "both buckets drawn (seed 1)"
    assert sum(r["image_tokens"] for r in run["records"]) == summary["visual_tokens"]
