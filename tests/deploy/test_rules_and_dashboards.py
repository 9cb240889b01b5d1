"""Prometheus rules and Grafana dashboards: the committed files are what the code generates, promtool
accepts the config and rules and passes the unit test of every alert, and every name a dashboard or
rule reads is a metric the catalog declares (or a recording rule defined beside it)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from serving.observability import render, rules
from serving.telemetry.metrics import CATALOG
from tests.deploy.conftest import ROOT

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"


def test_committed_files_are_the_generated_ones():
    stale = [path for path, text in render.files().items() if (ROOT / path).read_text() != text]
    assert not stale, f"regenerate with `make dashboards`: {stale}"


def promtool_run(promtool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=PROMETHEUS_DIR, timeout=120)


def test_promtool_checks_config_and_rules(promtool):
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "epd-rules.yml")):
        result = promtool_run(promtool, *args)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "18 rules found" in promtool_run(promtool, "check", "rules", "epd-rules.yml").stdout


def test_promtool_unit_tests_cover_every_alert(promtool):
    result = promtool_run(promtool, "test", "rules", "epd-rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROMETHEUS_DIR / "epd-rules.test.yml").read_text())["tests"]
    tested = {t["alertname"] for test in tests for t in test.get("alert_rule_test", []) if t["exp_alerts"]}
    assert tested == {r["alert"] for r in rules.alerting_rules(rules.DEFAULTS)}


def test_promtool_unit_tests_fail_when_a_threshold_moves(promtool, tmp_path):
    for name in ("epd-rules.yml", "epd-rules.test.yml"):
        (tmp_path / name).write_text((PROMETHEUS_DIR / name).read_text())
    text = render.rules_text(rules.Thresholds(attainment_target=0.4))
    (tmp_path / "epd-rules.yml").write_text(text)
    result = subprocess.run([promtool, "test", "rules", "epd-rules.test.yml"], capture_output=True, text=True,
                            cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0 and "EPDSLOAttainmentLow" in result.stdout + result.stderr


def recording_rule_names() -> set[str]:
    return {r["record"] for r in rules.recording_rules()}


def queried_names() -> dict[str, set[str]]:
    """Where each series name is read: dashboard panels, variables, annotations, rules."""
    exprs = [e for _, e in render.rule_expressions(rules.rule_groups())]
    for board in render.dashboards().values():
        exprs += [e for _, e in render.panel_queries(board) + render.variable_queries(board)]
        exprs += [e for _, e in render.annotation_queries(board)]
    out: dict[str, set[str]] = {}
    for expr in exprs:
        for name in render.metric_names(expr):
            out.setdefault(name, set()).add(expr)
    return out


def test_every_queried_name_is_in_the_catalog():
    names = queried_names()
    unknown = {n for n in names if render.catalog_name(n) not in CATALOG and n not in recording_rule_names()}
    assert not unknown, unknown
    # The dashboards and rules read most of the catalog (the rest is on /metrics for ad-hoc queries).
    read = {render.catalog_name(n) for n in names}
    assert len(read & set(CATALOG)) >= 30


@pytest.mark.parametrize(
    "expr, names",
    [
        ('sum(rate(epd:slo_met_total{model_name=~"$model"}[5m]))', {"epd:slo_met_total"}),
        ("histogram_quantile(0.9, sum by (le) (rate(epd:time_to_first_token_seconds_bucket[1m])))",
         {"epd:time_to_first_token_seconds_bucket"}),
        ('x{stage="epd:not_a_metric"} / model_name:epd_goodput:rate5m', {"model_name:epd_goodput:rate5m"}),
        ("epd:slo_met_totl", {"epd:slo_met_totl"}),
    ],
)  # fmt: skip
def test_metric_names_are_read_from_promql(expr, names):
    assert render.metric_names(expr) == names


def test_a_misspelled_metric_is_caught():
    assert render.catalog_name("epd:slo_met_totl") not in CATALOG
    assert render.catalog_name("epd:time_to_first_token_seconds_bucket") in CATALOG
    assert render.catalog_name("epd:prompt_tokens_total") in CATALOG


def test_dashboards_have_the_panels_the_issue_names():
    boards = render.dashboards()
    assert {b["title"] for b in boards.values()} == {
        "EPD Serve — SLO and goodput",
        "EPD Serve — stages and transfers",
    }
    titles = {title for b in boards.values() for title, _ in render.panel_queries(b)}
    wanted = [
        "SLO attainment", "Goodput and throughput", "Attainment against offered load", "TTFT percentiles",
        "TPOT percentiles", "TTFT by stage (mean, stacked)", "Queue wait per stage", "Queue depth per role",
        "KV cache usage per worker", "Embedding cache hit rate", "Transfer bytes per second per edge",
        "Transfer latency per edge", "Lease expiries and images encoded", "Errors by type and stage",
        "429s and finish reasons", "Worker roles over time",
    ]  # fmt: skip
    assert not [w for w in wanted if w not in titles]
    for board in boards.values():
        assert [v for v, _ in render.variable_queries(board)] == ["model", "worker"]
        assert "Role switches" in [a for a, _ in render.annotation_queries(board)]


def test_panels_and_queries_have_unique_ids():
    for board in render.dashboards().values():
        panels = [p for p in board["panels"]]
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)) and all(ids)
        for p in panels:
            refs = [t["refId"] for t in p.get("targets", [])]
            assert len(refs) == len(set(refs)) and all(refs), p["title"]
