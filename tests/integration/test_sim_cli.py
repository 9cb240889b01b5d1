"""`epd profile`, `epd simulate` and `epd plan` as a user runs them: a real profile of the tiny model
on this machine, then simulations and a plan from it; the report is `epd bench`'s (it plots)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def epd(*argv: str) -> str:
    cmd = [sys.executable, "-m", "serving.cli", *argv]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout


@pytest.fixture(scope="module")
def profile(tiny_model: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    printed = epd("profile", "--model", str(tiny_model), "--quick", "--out", str(out))
    assert "encode" in printed and "decode" in printed
    return out


def test_the_profile_measures_every_stage(profile: Path) -> None:
    data = json.loads(profile.read_text())
    costs = data["costs"]
    assert costs["decode_base_s"] > 0 and costs["prefill_per_token_s"] + costs["prefill_base_s"] > 0
    assert costs["encode_base_s"] + costs["encode_per_token_s"] > 0
    samples = data["samples"]
    assert len(samples["prefill"]) >= 3 and len(samples["decode"]) >= 3 and samples["encode"]
    # The fits describe what was measured: the largest batch's step and the longest prompt's prefill.
    batch, step_s = samples["decode"][-1]
    fitted = costs["decode_base_s"] + costs["decode_per_seq_s"] * (batch - 1)
    assert step_s / 2 < fitted < step_s * 2
    tokens, prefill_s = samples["prefill"][-1]
    assert prefill_s / 2 < costs["prefill_base_s"] + costs["prefill_per_token_s"] * tokens < prefill_s * 2
    assert data["tokens"]["tokens_per_word"] > 0


def test_simulate_prints_and_writes_the_bench_report(profile: Path, tmp_path: Path) -> None:
    report = tmp_path / "sim.json"
    printed = epd(
        "simulate", "--profile", str(profile), "--workload", "image-heavy", "--rates", "1,4",
        "--num-requests", "200", "--workers", "e=1,p=1,d=2", "--out", str(report),
    )  # fmt: skip
    assert printed.count("SLO (TTFT") == 2 and "utilisation per stage" in printed
    runs = json.loads(report.read_text())["runs"]
    assert [r["rate"] for r in runs] == [1.0, 4.0]
    for run in runs:
        assert run["summary"]["requests"] == 200 and len(run["records"]) == 200
        assert set(run["summary"]) >= {"ttft_s", "tpot_s", "slo_attainment", "goodput", "utilisation"}
    plots = epd("bench", "plot", str(report), "--out", str(tmp_path / "plots"))
    assert plots.strip() and all(Path(line).exists() for line in plots.split())


def test_simulate_runs_the_controller_on_a_shifting_trace(profile: Path, tmp_path: Path) -> None:
    # The measured profile with a slow vision tower (0.25 s an image): images need a second encoder.
    data = json.loads(profile.read_text())
    data["costs"]["encode_base_s"], data["costs"]["encode_per_token_s"] = 0.0, 0.004
    slow = tmp_path / "slow-encode.json"
    slow.write_text(json.dumps(data))
    printed = epd(
        "simulate", "--profile", str(slow), "--shift", "text:3:60,image-heavy:3:90",
        "--workers", "e=1,p=1,d=2", "--controller", "on", "--slo", "ttft=2,tpot=0.2",
    )  # fmt: skip
    assert "workers e=1,p=1,d=2, controller on" in printed and "x real time" in printed
    actions = [line for line in printed.splitlines() if line.strip().startswith("t=")]
    assert actions and "-> e" in actions[0] and "encode" in actions[0]
    first = float(actions[0].split("t=")[1].split()[0])
    assert first > 60  # nothing moved while the text phase met the SLO


def test_plan_ranks_splits_by_goodput(profile: Path) -> None:
    printed = epd(
        "plan", "--profile", str(profile), "--workload", "image-heavy", "--workers", "3",
        "--duration", "5", "--top", "4", "--slo", "ttft=0.2,tpot=0.05",
    )  # fmt: skip
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 4
    rates = [float(r[3]) for r in rows]
    assert rates == sorted(rates, reverse=True) and rates[0] > 0
    assert {r[1] for r in rows} <= {"e+p+d", "ep+d", "e+pd", "epd"}
