"""What both dashboards share: the data source and template variables (`$model`, `$worker`),
annotations (role switches; controller decisions once the catalog declares them), panel helpers."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import timeseries as ts
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from serving.telemetry.metrics import CATALOG

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
M = 'model_name=~"$model"'
MW = 'model_name=~"$model", worker=~"$worker"'
RATE = "$__rate_interval"
# The SLO controller's decisions; their annotation joins once the catalog declares the metric.
DECISIONS = "epd:controller_decisions_total"


def target(expr: str, legend: str) -> pb.Dataquery:
    return pb.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def panel(title: str, unit: str, description: str, *targets: pb.Dataquery, width: int = 12) -> ts.Panel:
    p = (
        ts.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .height(8)
        .span(width)
        .legend(
            cb.VizLegendOptions()
            .show_legend(True)
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
        )
    )
    for t in targets:
        p = p.with_target(t)
    return p


def quantiles(metric: str, selector: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[pb.Dataquery]:
    return [
        target(
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)}",
        )
        for q in qs
    ]


def slo_target(slo: str) -> pb.Dataquery:
    return target(f'max(epd:slo_target_seconds{{{M}, slo="{slo}"}})', "SLO target")


def dashed_target_line() -> tuple[dm.MatcherConfig, list[dm.DynamicConfigValue]]:
    """The SLO target series as a dashed red line, so the percentiles read against it."""
    return (
        dm.MatcherConfig(id_val="byName", options="SLO target"),
        [
            dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
            dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
        ],
    )


def attainment(counter: str, window: str) -> str:
    return (
        f"sum(increase({counter}{{{M}}}[{window}])) / sum(increase(epd:slo_requests_total{{{M}}}[{window}]))"
    )


# Arrivals: finished choices plus error answers (n > 1 requests count once per choice).
OFFERED = (
    f"sum(rate(epd:request_success_total{{{M}}}[{RATE}]))"
    f" + sum(rate(epd:request_errors_total{{{M}}}[{RATE}]))"
)


def variables() -> list[db.QueryVariable | db.DatasourceVariable]:
    return [
        db.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        db.QueryVariable("model")
        .label("Model")
        .datasource(DATASOURCE)
        .query("label_values(epd:slo_requests_total, model_name)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*"),
        db.QueryVariable("worker")
        .label("Worker")
        .datasource(DATASOURCE)
        .query(f"label_values(epd:worker_info{{{M}}}, worker)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(True)
        .include_all(True)
        .all_value(".*"),
    ]


# Grafana's Prometheus annotation keys the SDK does not model; `render.finish` adds them.
ANNOTATION_FORMATS = {
    "Role switches": {"titleFormat": "role switch", "step": "15s"},
    "Controller decisions": {
        "titleFormat": "controller: {{action}}",
        "textFormat": "mode {{mode}}, applied {{applied}}",
        "tagKeys": "action,mode,applied",
        "step": "15s",
    },
}


def annotations() -> list[db.AnnotationQuery]:
    def annotation(name: str, expr: str, color: str) -> db.AnnotationQuery:
        return (
            db.AnnotationQuery().name(name).datasource(DATASOURCE).enable(True).icon_color(color).expr(expr)
        )

    out = [
        annotation(
            "Role switches",
            f"sum(increase(epd:role_switches_total{{{M}}}[1m])) > 0",
            "blue",
        )
    ]
    if DECISIONS in CATALOG:
        out.append(
            annotation(
                "Controller decisions",
                f"sum by (action, mode, applied) (increase({DECISIONS}{{{M}}}[1m])) > 0",
                "purple",
            )
        )
    return out


def base(title: str, uid: str, description: str) -> db.Dashboard:
    d = (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["epd-serve"])
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .editable()
    )
    for v in variables():
        d = d.with_variable(v)
    for a in annotations():
        d = d.annotation(a)
    return d
