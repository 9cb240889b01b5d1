"""`EPD Serve — SLO and goodput`: what users feel. Attainment and goodput over time and against the
offered load, TTFT / TPOT percentiles against their targets, errors and 429s, admission, tokens."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import dashboard as dm

from serving.observability.panels import (
    OFFERED,
    RATE,
    M,
    attainment,
    base,
    dashed_target_line,
    panel,
    quantiles,
    slo_target,
    target,
)
from serving.telemetry.metrics import CATALOG

CONTROLLER_ATTAINMENT = "epd:controller_predicted_attainment"
RIGHT_AXIS_REQPS = [
    dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
    dm.DynamicConfigValue(id_val="unit", value="reqps"),
    dm.DynamicConfigValue(id_val="min", value=None),
    dm.DynamicConfigValue(id_val="max", value=None),
]


def slo_dashboard() -> db.Dashboard:
    d = base(
        "EPD Serve — SLO and goodput",
        "epd-slo-goodput",
        "SLO attainment and goodput, TTFT and TPOT against their targets, load, errors.",
    )
    d = d.with_row(db.Row("SLO attainment and goodput"))
    d = d.with_panel(
        panel(
            "SLO attainment",
            "percentunit",
            "Share of finished requests meeting both targets (TTFT and TPOT), and each one alone.",
            target(attainment("epd:slo_met_total", "1m"), "both, 1m"),
            target(attainment("epd:slo_met_total", "5m"), "both, 5m"),
            target(attainment("epd:slo_ttft_met_total", "5m"), "TTFT, 5m"),
            target(attainment("epd:slo_tpot_met_total", "5m"), "TPOT, 5m"),
        )
        .min(0)
        .max(1)
    )
    d = d.with_panel(
        panel(
            "Goodput and throughput",
            "reqps",
            "Requests per second meeting the SLO (goodput), judged against it, and offered.",
            target(f"sum(rate(epd:slo_met_total{{{M}}}[{RATE}]))", "goodput"),
            target(f"sum(rate(epd:slo_requests_total{{{M}}}[{RATE}]))", "judged"),
            target(OFFERED, "offered"),
        )
    )
    d = d.with_panel(
        panel(
            "Attainment against offered load",
            "percentunit",
            "SLO attainment (left) with the offered request rate (right): where attainment breaks.",
            target(attainment("epd:slo_met_total", RATE), "attainment"),
            target(OFFERED, "offered req/s"),
        )
        .min(0)
        .override_by_name("offered req/s", RIGHT_AXIS_REQPS)
    )
    if CONTROLLER_ATTAINMENT in CATALOG:  # the SLO controller's view, once it exports one
        d = d.with_panel(
            panel(
                "Controller: observed and predicted attainment",
                "percentunit",
                "What the SLO controller saw over its window and what its model predicts for the current "
                "pool; its decisions are the annotations.",
                target(f"max(epd:controller_observed_attainment{{{M}}})", "observed"),
                target(f"max({CONTROLLER_ATTAINMENT}{{{M}}})", "predicted"),
                target(f"max(epd:controller_observed_goodput{{{M}}})", "goodput (req/s)"),
            )
            .min(0)
            .override_by_name("goodput (req/s)", RIGHT_AXIS_REQPS)
        )
    d = d.with_row(db.Row("Latency against the targets"))
    ttft = panel(
        "TTFT percentiles",
        "s",
        "Time to first token at the gateway, with the TTFT target (--slo-ttft).",
        *quantiles("epd:time_to_first_token_seconds", M),
        slo_target("ttft"),
    )
    tpot = panel(
        "TPOT percentiles",
        "s",
        "Time per output token after the first, with the TPOT target (--slo-tpot).",
        *quantiles("epd:request_time_per_output_token_seconds", M),
        slo_target("tpot"),
    )
    d = d.with_panel(ttft.with_override(*dashed_target_line()))
    d = d.with_panel(tpot.with_override(*dashed_target_line()))
    d = d.with_panel(
        panel(
            "Inter-token latency and end-to-end latency",
            "s",
            "Gaps between streamed tokens, and arrival to last token.",
            *[
                t.legend_format(f"ITL p{p}")
                for t, p in zip(
                    quantiles("epd:inter_token_latency_seconds", M, (0.5, 0.99)), (50, 99), strict=True
                )
            ],
            *[
                t.legend_format(f"E2E p{p}")
                for t, p in zip(
                    quantiles("epd:e2e_request_latency_seconds", M, (0.5, 0.99)), (50, 99), strict=True
                )
            ],
        )
    )
    d = d.with_row(db.Row("Load and errors"))
    d = d.with_panel(
        panel(
            "Errors by type and stage",
            "reqps",
            "Error answers per second; refused requests count as invalid_request at the gateway.",
            target(
                f"sum by (error_type, stage) (rate(epd:request_errors_total{{{M}}}[{RATE}]))",
                "{{error_type}} ({{stage}})",
            ),  # fmt: skip
        )
    )
    d = d.with_panel(
        panel(
            "429s and finish reasons",
            "reqps",
            "Requests refused with 429 (admission queue or image budget full); finished choices by reason.",
            target(f'sum(rate(epd:request_errors_total{{{M}, error_type="rate_limited"}}[{RATE}]))', "429"),
            target(
                f"sum by (finished_reason) (rate(epd:request_success_total{{{M}}}[{RATE}]))",
                "{{finished_reason}}",
            ),  # fmt: skip
        )
    )
    d = d.with_panel(
        panel(
            "Admission",
            "short",
            "Requests and sequences admitted into the stages, and requests waiting for admission.",
            target(f"sum(epd:num_requests_running{{{M}}})", "requests running"),
            target(f"sum(epd:num_sequences_running{{{M}}})", "sequences running"),
            target(f"sum(epd:num_requests_waiting{{{M}}})", "requests waiting"),
        )
    )
    d = d.with_panel(
        panel(
            "Tokens per second",
            "short",
            "Prompt tokens (image tokens included) and generated tokens per second.",
            target(f"sum(rate(epd:prompt_tokens_total{{{M}}}[{RATE}]))", "prompt"),
            target(f"sum(rate(epd:generation_tokens_total{{{M}}}[{RATE}]))", "generated"),
        )
    )
    return d
