"""Controller metrics: its decisions (by action, mode and whether they were applied), and what it
saw and predicted on its last tick. Read from the controller at scrape time. Every label set of the
decision counter exists from the start (at 0), so dashboards and rules always find a series."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.controller.actions import ActionKind

if TYPE_CHECKING:
    from serving.control.plane import ControlPlane

CONTROLLER_CATALOG = (
    "epd:controller_decisions_total",
    "epd:controller_mode",
    "epd:controller_observed_attainment",
    "epd:controller_predicted_attainment",
    "epd:controller_observed_goodput",
)
_MODES = ("off", "advisory", "on")


class ControllerCollector(Collector):
    """`plane.controller` is read at each scrape: the controller may start after the service."""

    def __init__(self, model_name: str, plane: ControlPlane) -> None:
        self.model, self.plane = model_name, plane

    def collect(self) -> Iterator[Metric]:
        m, c = self.model, self.plane.controller
        decisions = CounterMetricFamily(
            "epd:controller_decisions",
            "Controller decisions by action; applied=false: advisory, or the action failed.",
            labels=["model_name", "action", "mode", "applied"],
        )
        for kind in ActionKind:
            for mode in ("advisory", "on"):
                for applied in (True, False):
                    n = c.counts.get((kind.value, mode, applied), 0) if c else 0
                    decisions.add_metric([m, kind.value, mode, str(applied).lower()], n)
        mode = GaugeMetricFamily(
            "epd:controller_mode",
            "1 for the controller's mode (off, advisory, on).",
            labels=["model_name", "mode"],
        )
        current = c.cfg.mode if c else "off"
        for name in _MODES:
            mode.add_metric([m, name], 1.0 if name == current else 0.0)
        obs = c.last if c else None
        pred = c.predicted if c else None
        observed = GaugeMetricFamily(
            "epd:controller_observed_attainment",
            "SLO attainment over the controller's window (1 when no request finished in it).",
            labels=["model_name"],
        )
        observed.add_metric([m], obs.attainment if obs else 1.0)
        predicted = GaugeMetricFamily(
            "epd:controller_predicted_attainment",
            "SLO attainment the controller's model predicts for the current pool and load.",
            labels=["model_name"],
        )
        predicted.add_metric([m], pred.attainment if pred else 1.0)
        goodput = GaugeMetricFamily(
            "epd:controller_observed_goodput",
            "Requests per second meeting the SLO over the controller's window.",
            labels=["model_name"],
        )
        goodput.add_metric([m], obs.goodput if obs else 0.0)
        yield from (decisions, mode, observed, predicted, goodput)
