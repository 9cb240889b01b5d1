"""Control-plane metrics: workers by role and phase, role switches, drains, migrations, restarts and
per-stage retries / failures. Workers and the actuator's counters are the deployment's (the gateway's
mirror of the directory, the control actor's latest report); migrations, retries and failures are
counted by this gateway's pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.types import Role, WorkerPhase, roles_label

if TYPE_CHECKING:
    from serving.control.client import ControlClient
    from serving.pipeline import Pipeline

CONTROL_CATALOG = (
    "epd:workers",
    "epd:worker_info",
    "epd:role_switches_total",
    "epd:drains_total",
    "epd:drain_evictions_total",
    "epd:worker_failures_total",
    "epd:worker_restarts_total",
    "epd:role_switch_last_seconds",
    "epd:migrations_total",
    "epd:stage_retries_total",
    "epd:stage_failures_total",
    "epd:stage_unavailable_total",
)


class ControlCollector(Collector):
    def __init__(self, model_name: str, plane: ControlClient) -> None:
        self.model, self.plane = model_name, plane

    def collect(self) -> Iterator[Metric]:
        m = self.model
        entries = self.plane.directory.entries()
        workers = GaugeMetricFamily(
            "epd:workers", "Workers by role and phase.", labels=["model_name", "role", "phase"]
        )
        for role in Role:
            for phase in WorkerPhase:
                n = sum(1 for e in entries if role in e.roles and e.phase is phase)
                workers.add_metric([m, role.name.lower(), phase.value], n)
        info = GaugeMetricFamily(
            "epd:worker_info",
            "1 per worker, labelled with its roles and phase.",
            labels=["model_name", "worker", "roles", "phase"],
        )
        for e in entries:
            info.add_metric([m, e.name, roles_label(e.roles), e.phase.value], 1)
        yield from (workers, info)
        c = self.plane.report.counters
        for name, text, value in (
            ("epd:role_switches", "Role switches completed.", c.switches),
            ("epd:drains", "Drains completed.", c.drains),
            ("epd:drain_evictions", "Streams moved off a worker at a drain's deadline.", c.evictions),
            ("epd:worker_failures", "Workers found dead, unreachable or wedged.", c.failures),
            ("epd:worker_restarts", "Failed workers replaced.", c.restarts),
        ):
            family = CounterMetricFamily(name, text, labels=["model_name"])
            family.add_metric([m], value)
            yield family
        last = GaugeMetricFamily(
            "epd:role_switch_last_seconds", "Duration of the latest role switch.", labels=["model_name"]
        )
        last.add_metric([m], c.switch_seconds[-1] if c.switch_seconds else 0.0)
        yield last


class PipelineCollector(Collector):
    """What this gateway's pipeline counted: migrations, and retries, failures and 503s by stage."""

    def __init__(self, model_name: str, pipeline: Pipeline) -> None:
        self.model, self.pipeline = model_name, pipeline

    def collect(self) -> Iterator[Metric]:
        m, p = self.model, self.pipeline.counters
        migrations = CounterMetricFamily(
            "epd:migrations",
            "Requests whose decode moved to another worker mid-stream.",
            labels=["model_name"],
        )
        migrations.add_metric([m], p.migrations)
        yield migrations
        for name, text, values in (
            ("epd:stage_retries", "Legs redone on another worker, by stage.", p.retries),
            ("epd:stage_failures", "Requests failed by a stage after its retries, by stage.", p.failures),
            (
                "epd:stage_unavailable",
                "Requests no worker could take in time (503), by stage.",
                p.unavailable,
            ),
        ):
            family = CounterMetricFamily(name, text, labels=["model_name", "stage"])
            for stage, value in values.items():
                family.add_metric([m, stage], value)
            yield family
