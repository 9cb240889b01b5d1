"""`EPD Serve — stages and transfers`: where a request's time goes. TTFT by stage (stacked), stage
queues, KV usage and embedding-cache hits per worker, E→P / P→D bytes and latency, leases, and the
workers' roles and phases over time."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import common as cm

from serving.observability.panels import MW, RATE, M, base, panel, target

# The stages up to the first streamed token and the hand-over after it: the first token leaves with
# the prefill result, and P→D is what the second token waits for; stacked in request order.
TTFT_STAGES = ("media", "encode", "e2p_transfer", "prefill", "p2d_transfer")


def stage_mean(stages: str) -> str:
    return (
        f'sum by (stage) (rate(epd:stage_duration_seconds_sum{{{M}, stage=~"{stages}"}}[{RATE}]))\n'
        f'/ sum by (stage) (rate(epd:stage_duration_seconds_count{{{M}, stage=~"{stages}"}}[{RATE}]))'
    )


def stages_dashboard() -> db.Dashboard:
    d = base(
        "EPD Serve — stages and transfers",
        "epd-stages-transfers",
        "TTFT by stage, stage queues, KV and embedding cache per worker, E→P and P→D transfers, leases, "
        "worker roles.",
    )
    d = d.with_row(db.Row("Time to first token by stage"))
    d = d.with_panel(
        panel(
            "TTFT by stage (mean, stacked)",
            "s",
            "Mean time per request in the queues (gateway admission + prefill queue), encode, E→P and "
            "prefill (together the first token's time), then P→D (the KV hand-over the second token "
            "waits for), stacked in request order.",
            target(
                f"sum(rate(epd:request_queue_time_seconds_sum{{{M}}}[{RATE}]))\n"
                f"/ sum(rate(epd:request_queue_time_seconds_count{{{M}}}[{RATE}]))",
                "queue",
            ),
            target(stage_mean("|".join(TTFT_STAGES)), "{{stage}}"),
        )
        .stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
        .fill_opacity(40)
    )
    d = d.with_panel(
        panel(
            "Stage duration p90",
            "s",
            "90th percentile of the time a request spends in each stage (decode: its whole stream).",
            target(
                f"histogram_quantile(0.9, sum by (stage, le) "
                f"(rate(epd:stage_duration_seconds_bucket{{{M}}}[{RATE}])))",
                "{{stage}}",
            ),
        )
    )
    d = d.with_row(db.Row("Queues"))
    d = d.with_panel(
        panel(
            "Queue wait per stage",
            "s",
            "Time requests wait in a worker's queue for an encode or prefill batch (p90 and mean), and "
            "for admission at the gateway plus the prefill queue (mean).",
            target(
                f"histogram_quantile(0.9, sum by (stage, le) "
                f"(rate(epd:stage_queue_time_seconds_bucket{{{M}}}[{RATE}])))",
                "{{stage}} p90",
            ),
            target(
                f"sum by (stage) (rate(epd:stage_queue_time_seconds_sum{{{M}}}[{RATE}]))\n"
                f"/ sum by (stage) (rate(epd:stage_queue_time_seconds_count{{{M}}}[{RATE}]))",
                "{{stage}} mean",
            ),
        )
    )
    d = d.with_panel(
        panel(
            "Queue depth per role",
            "short",
            "Requests queued in the engines of the workers holding each role set, and requests waiting "
            "for admission at the gateway.",
            target(
                f"sum by (roles) (epd:worker_requests_waiting{{{MW}}}\n"
                f"  * on (model_name, worker) group_left (roles) epd:worker_info{{{M}}})",
                "{{roles}} waiting",
            ),
            target(
                f"sum by (roles) (epd:worker_requests_running{{{MW}}}\n"
                f"  * on (model_name, worker) group_left (roles) epd:worker_info{{{M}}})",
                "{{roles}} running",
            ),
            target(f"sum(epd:num_requests_waiting{{{M}}})", "gateway admission"),
        )
    )
    d = d.with_row(db.Row("Workers"))
    d = d.with_panel(
        panel(
            "KV cache usage per worker",
            "percentunit",
            "Share of each worker's KV blocks in use.",
            target(f"epd:kv_cache_usage_perc{{{MW}}}", "{{worker}}"),
        )
        .min(0)
        .max(1)
    )
    d = d.with_panel(
        panel(
            "Embedding cache hit rate",
            "percentunit",
            "Share of image lookups served from the encode workers' embedding cache.",
            target(
                f"sum by (worker) (rate(epd:mm_cache_hits_total{{{MW}}}[{RATE}]))\n"
                f"/ sum by (worker) (rate(epd:mm_cache_queries_total{{{MW}}}[{RATE}]))",
                "{{worker}}",
            ),
            target(
                f"sum(rate(epd:mm_cache_hits_total{{{M}}}[{RATE}]))\n"
                f"/ sum(rate(epd:mm_cache_queries_total{{{M}}}[{RATE}]))",
                "all",
            ),
        )
        .min(0)
        .max(1)
    )
    d = d.with_panel(
        panel(
            "Workers by role and phase",
            "short",
            "Workers holding each role, by phase (starting, active, draining, reconfiguring, failed).",
            target(f"sum by (role, phase) (epd:workers{{{M}}}) > 0", "{{role}} {{phase}}"),
        )
    )
    d = d.with_panel(
        panel(
            "Worker roles over time",
            "short",
            "One line per worker, named by its roles and phase: role switches show as a line ending "
            "and another starting.",
            target(
                f"max by (worker, roles, phase) (epd:worker_info{{{MW}}})", "{{worker}}: {{roles}} {{phase}}"
            ),
        )
    )
    d = d.with_row(db.Row("Transfers and leases"))
    d = d.with_panel(
        panel(
            "Transfer bytes per second per edge",
            "Bps",
            "Embeddings moved E→P (e2p) and KV moved P→D (p2d).",
            target(f"sum by (edge) (rate(epd:transfer_bytes_total{{{M}}}[{RATE}]))", "{{edge}}"),
        )
    )
    d = d.with_panel(
        panel(
            "Transfer latency per edge",
            "s",
            "Time of the E→P and P→D pulls (p50, p90).",
            *[
                target(
                    f"histogram_quantile({q}, sum by (stage, le) (rate(epd:stage_duration_seconds_bucket"
                    f'{{{M}, stage=~"e2p_transfer|p2d_transfer"}}[{RATE}])))',
                    f"{{{{stage}}}} p{round(q * 100)}",
                )
                for q in (0.5, 0.9)
            ],
        )
    )
    d = d.with_panel(
        panel(
            "Lease expiries and images encoded",
            "short",
            "Per second: held embeddings / KV freed unpulled at their deadline, and images through "
            "the vision tower, per worker.",
            target(f"sum by (worker) (rate(epd:lease_expired_total{{{MW}}}[{RATE}]))", "{{worker}} expired"),
            target(f"sum by (worker) (rate(epd:images_encoded_total{{{MW}}}[{RATE}]))", "{{worker}} encoded"),
        )
    )
    d = d.with_panel(
        panel(
            "Control plane events",
            "short",
            "Per minute: role switches, drains, worker failures and restarts, decode migrations, legs "
            "retried on another worker and requests a stage could not place (503).",
            *[
                target(f"sum(increase(epd:{name}_total{{{M}}}[1m]))", name.replace("_", " "))
                for name in ("role_switches", "drains", "worker_failures", "worker_restarts", "migrations")
            ],
            target(f"sum by (stage) (increase(epd:stage_retries_total{{{M}}}[1m]))", "{{stage}} retries"),
            target(
                f"sum by (stage) (increase(epd:stage_unavailable_total{{{M}}}[1m]))", "{{stage}} unavailable"
            ),
        )
    )
    return d
