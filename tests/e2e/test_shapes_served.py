"""The shipped `epd-shapes` served: through every topology its answers equal the in-process engine's,
item for item (greedy); `epd eval` reports sound fields against a live server and merges `--extra`
into every request; `epd bench --workload shapes` scores the answers it gets under load."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from loadgen.cli import bench
from loadgen.server import start_server, stop_server
from serving.config import default_model
from serving.evals.inprocess import evaluate_in_process
from serving.evals.served import evaluate_served
from serving.evals.tasks import items

# Every task, the video one included; seeds never used in training.
TASKS = ["colour", "shape", "count", "count_colour", "side", "read", "motion"]
SEED, N = 31337, 5
MODEL = str(default_model())


@pytest.fixture(scope="module")
def expected():
    return evaluate_in_process(MODEL, items(SEED, TASKS, N), SEED)


# Media are decoded on the encode worker, except in `epd`, which runs the gateway-decoding option:
# both must give the in-process answers.
SERVERS = {"e+p+d": [], "epd": ["--media-decode", "gateway"], "ep+d": [], "e+pd": []}


@pytest.fixture(scope="module", params=list(SERVERS))
def shapes_server(request, tmp_path_factory):
    log = tmp_path_factory.mktemp("shapes") / f"serve-{request.param}.log"
    flags = ["--model", MODEL, "--topology", request.param, *SERVERS[request.param]]
    proc, url = start_server(flags, log, timeout_s=240)
    yield request.param, url
    stop_server(proc)


def test_served_answers_equal_in_process(shapes_server, expected):
    topology, url = shapes_server
    report = asyncio.run(
        evaluate_served(f"{url}/v1", "epd-shapes", items(SEED, TASKS, N), SEED, concurrency=6)
    )
    assert [o.error for o in report.outcomes] == [None] * len(report.outcomes), topology
    assert [o.reply for o in report.outcomes] == [o.reply for o in expected.outcomes], topology
    assert [o.prompt_tokens for o in report.outcomes] == [o.prompt_tokens for o in expected.outcomes]
    # A trained model, not a random one: colours, the task the shipped weights have learned, are right.
    assert all(o.correct for o in report.outcomes if o.task == "colour")


def _eval(url: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "serving.cli", "eval", "--base-url", f"{url}/v1", "--model", "epd-shapes"]
    return subprocess.run([*cmd, *flags], capture_output=True, text=True, timeout=300)


def test_eval_cli_report(shapes_server, tmp_path):
    topology, url = shapes_server
    if topology != "e+p+d":
        pytest.skip("once is enough")
    out = tmp_path / "report.json"
    done = _eval(url, "--tasks", "colour,read", "--n", "4", "--seed", "11", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "colour" in done.stdout and "items/s" in done.stdout
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"colour", "read"} and report["seed"] == 11
    for score in report["tasks"].values():
        lo, hi = score["interval"]
        assert score["n"] == 4 and 0 <= lo <= score["accuracy"] <= hi <= 1
        assert score["errors"] == 0 and score["mean_prompt_tokens"] > 30
    assert len(report["items"]) == 8 and report["items_per_second"] > 0
    # --extra reaches every request: naming another model makes every one a 404.
    done = _eval(
        url, "--tasks", "shape", "--n", "3", "--extra", '{"model": "no-such-model"}', "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["tasks"]["shape"]["errors"] == 3 and report["tasks"]["shape"]["correct"] == 0
    assert all(i["error"].startswith("http 404") for i in report["items"])
    assert report["extra"] == {"model": "no-such-model"}


def test_bench_shapes_workload_scores_answers(shapes_server, tmp_path, expected):
    topology, url = shapes_server
    if topology != "e+p+d":
        pytest.skip("once is enough")
    out = tmp_path / "bench.json"
    args = SimpleNamespace(
        base_url=f"{url}/v1", model="epd-shapes", api_key=None, workload="shapes", image_repeat_ratio=None,
        mm_bucket=None,
        rate=None, rates=None, concurrency=4, arrival="poisson", burstiness=1.0, num_requests=12,
        duration=None, warmup=0, seed=0, slo="ttft=30,tpot=5", out=str(out), no_progress=True,
    )  # fmt: skip
    bench(args)
    run = json.loads(out.read_text())["runs"][0]
    answers = run["summary"]["answers"]
    records = run["records"]
    assert answers["scored"] == 12 == len(records)
    assert answers["right"] == sum(r["correct"] for r in records)
    assert all(r["expected"] and r["error"] is None for r in records)
    colours = {i for i in range(12) if i % 7 == 0}  # the workload asks the seven tasks in turn
    assert all(r["correct"] for r in records if r["index"] in colours) and answers["right"] >= len(colours)
