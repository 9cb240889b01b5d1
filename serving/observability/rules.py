"""Prometheus recording and alerting rules, as data.

One definition feeds two files: `deploy/prometheus/epd-rules.yml` (plain installs, thresholds at
their defaults) and the Helm chart's `files/epd-rules.yaml`, where each threshold is a Helm
expression over `.Values.alerts` (the chart renders it with `tpl`). A test renders the chart with its
default values and requires the result to equal the plain file, so the two cannot drift.

Recording rules follow Prometheus' `level:metric:operations` naming: `model_name:epd_…:ratio_rate5m`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

WINDOWS = ("1m", "5m")


@dataclass(frozen=True)
class Thresholds:
    """Alert thresholds; values are numbers, or Helm expressions when rendering the chart's copy."""

    attainment_target: float | str = 0.9  # share of judged requests meeting both SLOs
    goodput_drop_ratio: float | str = 0.5  # goodput below this share of its value 30 minutes earlier
    error_ratio: float | str = 0.05  # server-side errors per answered request
    lease_expiries: float | str = 0  # leases expired unpulled over 10 minutes, above which we alert
    worker_restarts: float | str = 0  # workers replaced over 15 minutes, above which we alert


DEFAULTS = Thresholds()


def helm_value(field: str) -> str:
    """`error_ratio` → the chart's `.Values.alerts.errorRatio` (Helm values are camelCase). The
    attainment target is the SLO's own (`.Values.slo.attainmentTarget`, the controller aims at it too)."""
    head, *rest = field.split("_")
    section = "slo" if field == "attainment_target" else "alerts"
    return f".Values.{section}." + head + "".join(w.capitalize() for w in rest)


# Placeholders that survive YAML dumping; `render` swaps them for Helm expressions afterwards.
HELM = Thresholds(**{f.name: f"__HELM__{f.name}__" for f in fields(Thresholds)})

# Errors the server is answerable for; refusals of bad or excess requests are the client's side.
SERVER_ERRORS = 'error_type=~"stage_failed|timeout|unavailable|internal"'


def recording_rules() -> list[dict]:
    rules: list[dict] = []
    for w in WINDOWS:
        rules += [
            {
                "record": f"model_name:epd_slo_attainment:ratio_rate{w}",
                "expr": f"sum by (model_name) (increase(epd:slo_met_total[{w}]))\n"
                f"/ sum by (model_name) (increase(epd:slo_requests_total[{w}]))",
            },
            {
                "record": f"model_name:epd_ttft_attainment:ratio_rate{w}",
                "expr": f"sum by (model_name) (increase(epd:slo_ttft_met_total[{w}]))\n"
                f"/ sum by (model_name) (increase(epd:slo_requests_total[{w}]))",
            },
            {
                "record": f"model_name:epd_tpot_attainment:ratio_rate{w}",
                "expr": f"sum by (model_name) (increase(epd:slo_tpot_met_total[{w}]))\n"
                f"/ sum by (model_name) (increase(epd:slo_requests_total[{w}]))",
            },
            {
                "record": f"model_name:epd_goodput:rate{w}",
                "expr": f"sum by (model_name) (rate(epd:slo_met_total[{w}]))",
            },
            {
                "record": f"model_name:epd_slo_requests:rate{w}",
                "expr": f"sum by (model_name) (rate(epd:slo_requests_total[{w}]))",
            },
            {
                "record": f"model_name:epd_server_errors:ratio_rate{w}",
                "expr": f"sum by (model_name) (rate(epd:request_errors_total{{{SERVER_ERRORS}}}[{w}]))\n"
                f"/ (sum by (model_name) (rate(epd:request_success_total[{w}]))\n"
                f"   + sum by (model_name) (rate(epd:request_errors_total[{w}])))",
            },
        ]
    return rules


def alerting_rules(t: Thresholds) -> list[dict]:
    def alert(name: str, expr: str, duration: str, severity: str, summary: str, description: str) -> dict:
        return {
            "alert": name,
            "expr": expr,
            "for": duration,
            "labels": {"severity": severity},
            "annotations": {"summary": summary, "description": description},
        }

    return [
        alert(
            "EPDSLOAttainmentLow",
            f"model_name:epd_slo_attainment:ratio_rate5m < {t.attainment_target}",
            "5m",
            "warning",
            "SLO attainment of {{ $labels.model_name }} is {{ $value | humanizePercentage }}",
            "Fewer requests than the target meet both the TTFT and the TPOT SLO over 5 minutes. "
            "Look at TTFT by stage on the stages dashboard to see which stage grew.",
        ),
        alert(
            "EPDGoodputDrop",
            f"model_name:epd_goodput:rate5m\n"
            f"  < {t.goodput_drop_ratio} * (model_name:epd_goodput:rate5m offset 30m)\n"
            f"and on (model_name) model_name:epd_slo_requests:rate5m\n"
            f"  > {t.goodput_drop_ratio} * (model_name:epd_slo_requests:rate5m offset 30m)",
            "10m",
            "warning",
            "Goodput of {{ $labels.model_name }} fell to {{ $value | humanize }} req/s",
            "Requests meeting the SLO per second fell below the set share of their value 30 minutes "
            "earlier while the judged load did not fall as much: the same traffic is served worse.",
        ),
        alert(
            "EPDRoleWithoutActiveWorker",
            'sum by (model_name, role) (epd:workers{phase="active"}) == 0',
            "1m",
            "critical",
            "No active {{ $labels.role }} worker for {{ $labels.model_name }}",
            "Requests that need this stage wait for a worker and then fail with 503; /ready "
            "reports not ready. Check failed workers (epd ctl workers) and the restart budget.",
        ),
        alert(
            "EPDLeaseExpiries",
            f"sum by (model_name, worker) (increase(epd:lease_expired_total[10m])) > {t.lease_expiries}",
            "0m",
            "warning",
            "{{ $labels.worker }} freed {{ $value | humanize }} unpulled leases",
            "Embeddings or KV held for a next stage were never pulled before their deadline: a peer "
            "died or stalled mid-transfer, or the lease TTL is shorter than the stage queue.",
        ),
        alert(
            "EPDWorkerRestarts",
            f"sum by (model_name) (increase(epd:worker_restarts_total[15m])) > {t.worker_restarts}",
            "0m",
            "warning",
            "{{ $value | humanize }} workers of {{ $labels.model_name }} replaced in 15 minutes",
            "Workers died, stopped answering or their engine wedged, and the control plane replaced "
            "them. Repeated restarts use up the restart budget (--max-worker-restarts).",
        ),
        alert(
            "EPDServerErrorRate",
            f"model_name:epd_server_errors:ratio_rate5m > {t.error_ratio}",
            "5m",
            "critical",
            "{{ $value | humanizePercentage }} of {{ $labels.model_name }} requests fail on the server",
            "Stage failures, timeouts, 503s and internal errors over all answered requests. The "
            "errors panel splits them by type and stage.",
        ),
    ]


def rule_groups(t: Thresholds = DEFAULTS) -> dict:
    """The rules file's content: recording rules first, alerts over them in a second group."""
    return {
        "groups": [
            {"name": "epd-serve-slo", "rules": recording_rules()},
            {"name": "epd-serve-alerts", "rules": alerting_rules(t)},
        ]
    }
