"""The dashboards and rules against real data: a real Prometheus scrapes a live `epd serve` (tiny model)
while the load generator drives it; then every dashboard query and every recording rule returns data
through Prometheus' query API, and every metric the catalog declares has samples."""

from __future__ import annotations

import math
import time

import pytest

from loadgen.cli import bench, run_parser
from loadgen.server import start_server, stop_server
from serving.observability import render, rules
from serving.telemetry.metrics import CATALOG
from tests.deploy.conftest import ROOT, tool
from tests.e2e.prometheus import Prometheus

NUM_REQUESTS = 24
RATE_WINDOW = "30s"  # what Grafana's $__rate_interval is at a 1 s scrape, rounded up


@pytest.fixture(scope="module")
def observed(tiny_model, tmp_path_factory):
    """(prometheus, model id, time to evaluate at) after a load run, with everything scraped."""
    binary = tool("prometheus", "run `make tools` (apt-get install prometheus); apt was unavailable here")
    work = tmp_path_factory.mktemp("observability")
    proc, url = start_server(["--model", str(tiny_model), "--max-model-len", "2048"], work / "serve.log", 240)
    prometheus = Prometheus(
        binary, url.removeprefix("http://"), ROOT / "deploy/prometheus/epd-rules.yml", work
    )
    try:
        # The counters must be scraped at 0 before the load: increase() sees no rise in a series whose
        # first sample already holds the final count (the rules would read 0/0).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not prometheus.query("epd:slo_requests_total"):
            time.sleep(0.5)
        # Image-heavy with repeats: encode, both transfers and embedding-cache hits all see traffic.
        args = run_parser().parse_args([
            "--base-url", f"{url}/v1", "--model", tiny_model.name, "--workload", "image-heavy",
            "--image-repeat-ratio", "0.5", "--rate", "4", "--num-requests", str(NUM_REQUESTS),
            "--warmup", "1", "--seed", "5", "--no-progress",
        ])  # fmt: skip
        bench(args)
        done = time.time()
        # Wait until a scrape after the load has been taken and every recording rule (each group
        # evaluates on its own schedule) has been evaluated over it; then read at that moment.
        names = [
            name for name, _ in render.rule_expressions(rules.rule_groups()) if name.startswith("model_name:")
        ]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            judged = prometheus.query("sum(epd:slo_requests_total)")
            fresh = all(prometheus.query(f"timestamp({name}) > {done}") for name in names)
            if judged and float(judged[0]["value"][1]) >= NUM_REQUESTS and fresh:
                break
            time.sleep(0.5)
        yield prometheus, tiny_model.name, time.time()
    finally:
        prometheus.stop()
        stop_server(proc)


def substitute(expr: str, model: str) -> str:
    return expr.replace("$model", model).replace("$worker", ".*").replace("$__rate_interval", RATE_WINDOW)


def dashboard_queries() -> list[tuple[str, str]]:
    return [(f"{name}: {title}", expr) for name, board in render.dashboards().items()
            for title, expr in render.panel_queries(board)]  # fmt: skip


def test_every_dashboard_query_returns_data(observed):
    prometheus, model, at = observed
    empty = [
        (where, expr)
        for where, expr in dashboard_queries()
        if not prometheus.query(substitute(expr, model), at)
    ]
    assert not empty, empty


def test_every_recording_rule_returns_data_and_alerts_parse(observed):
    prometheus, _, at = observed
    for name, expr in render.rule_expressions(rules.rule_groups()):
        result = prometheus.query(expr, at)  # alert expressions must at least be valid PromQL here
        if name.startswith("model_name:"):
            assert result, name
    recorded = {r["name"] for g in prometheus.api("rules")["groups"] for r in g["rules"]}
    assert recorded == {name for name, _ in render.rule_expressions(rules.rule_groups())}
    health = {r["name"]: r["health"] for g in prometheus.api("rules")["groups"] for r in g["rules"]}
    assert set(health.values()) == {"ok"}, health


def test_template_variables_and_annotations_resolve(observed):
    prometheus, model, at = observed
    assert prometheus.api("label/model_name/values", **{"match[]": "epd:slo_requests_total"}) == [model]
    workers = prometheus.api("label/worker/values", **{"match[]": f'epd:worker_info{{model_name="{model}"}}'})
    assert len(workers) == 3  # e+p+d
    for board in render.dashboards().values():
        for _, expr in render.annotation_queries(board):
            prometheus.query(substitute(expr, model), at)  # valid PromQL (no decision needs to have happened)


def test_every_catalog_metric_has_samples(observed):
    prometheus, _, _ = observed
    exported = {render.catalog_name(n) for n in prometheus.api("label/__name__/values")}
    missing = [name for name in CATALOG if name not in exported]
    assert not missing, missing


def value(prometheus: Prometheus, expr: str, at: float) -> float:
    (sample,) = prometheus.query(expr, at)
    return float(sample["value"][1])


def test_the_numbers_are_the_load_we_sent(observed):
    prometheus, model, at = observed
    m = f'model_name="{model}"'
    assert value(prometheus, f"sum(epd:slo_requests_total{{{m}}})", at) >= NUM_REQUESTS
    attainment = value(prometheus, f"model_name:epd_slo_attainment:ratio_rate5m{{{m}}}", at)
    assert 0 <= attainment <= 1 and not math.isnan(attainment)
    for edge in ("e2p", "p2d"):
        assert value(prometheus, f'sum(epd:transfer_bytes_total{{{m}, edge="{edge}"}})', at) > 0
    assert value(prometheus, f"sum(epd:mm_cache_hits_total{{{m}}})", at) > 0
    assert value(prometheus, f'sum(epd:workers{{{m}, phase="active"}})', at) == 3
