"""The shipped `epd-shapes` served: through every topology (one server's workers switched between
them) its answers equal the in-process engine's, item for item (greedy); `epd eval` reports sound
fields against a live server and merges `--extra` into every request; `epd bench --workload shapes`
scores the answers it gets under load."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from types import SimpleNamespace

import httpx
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


# The four topologies on one server's three workers, by switching and draining them through the admin
# API (roles change at run time without reloading anything): the worker started as E, the one started
# as P and the one started as D, each (roles, routed?) per topology.
TOPOLOGIES = {
    "e+p+d": (("e", True), ("p", True), ("d", True)),
    "e+pd": (("e", True), ("pd", True), ("d", False)),
    "ep+d": (("ep", True), ("p", False), ("d", True)),
    "epd": (("epd", True), ("p", False), ("d", False)),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("shapes") / "serve.log"
    proc, url = start_server(["--model", MODEL, "--topology", "e+p+d"], log, timeout_s=240)
    yield url
    stop_server(proc)


def _arrange(url: str, topology: str) -> None:
    """Give the three workers the roles and routing of `topology`."""
    workers = httpx.get(f"{url}/admin/workers", timeout=30).json()["workers"]
    by_start = {w["name"].split("-", 1)[0]: w for w in workers}  # named after the roles they began with
    for (roles, routed), started in zip(TOPOLOGIES[topology], ("e", "p", "d"), strict=True):
        worker = by_start[started]
        base = f"{url}/admin/workers/{worker['name']}"
        if not routed:
            if worker["routing"]:
                assert httpx.post(f"{base}/drain", timeout=120).status_code == 200
        elif worker["roles"] != roles or not worker["routing"]:
            switched = httpx.post(f"{base}/switch", json={"roles": roles}, timeout=120)
            assert switched.status_code == 200, switched.text
    workers = httpx.get(f"{url}/admin/workers", timeout=30).json()["workers"]
    routed = sorted(w["routing"] for w in workers if w["routing"])
    assert routed == sorted(roles for roles, on in TOPOLOGIES[topology] if on), (topology, workers)


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def shapes_server(request, server):
    _arrange(server, request.param)
    return request.param, server


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
