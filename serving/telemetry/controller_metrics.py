"""Controller metrics: its decisions (by action, mode and whether they were applied), and what it
saw and predicted on its last tick, as of the control actor's latest report (read at each scrape).
Every label set of the decision counter exists from the start (at 0), so dashboards and rules always
find a series."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.control.records import ControllerSummary
from serving.controller.actions import ActionKind

CONTROLLER_CATALOG = (
    "epd:controller_decisions_total",
    "epd:controller_mode",
    "epd:controller_observed_attainment",
    "epd:controller_predicted_attainment",
    "epd:controller_observed_goodput",
)
_MODES = ("off", "advisory", "on")


class ControllerCollector(Collector):
    """`summary()` is read at each scrape (None: no controller runs)."""

    def __init__(self, model_name: str, summary: Callable[[], ControllerSummary | None]) -> None:
        self.model, self.summary = model_name, summary

    def collect(self) -> Iterator[Metric]:
        m, c = self.model, self.summary()
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
        current = c.mode if c else "off"
        for name in _MODES:
            mode.add_metric([m, name], 1.0 if name == current else 0.0)
        observed = GaugeMetricFamily(
            "epd:controller_observed_attainment",
            "SLO attainment over the controller's window (1 when no request finished in it).",
            labels=["model_name"],
        )
        observed.add_metric([m], _or(c and c.observed_attainment, 1.0))
        predicted = GaugeMetricFamily(
            "epd:controller_predicted_attainment",
            "SLO attainment the controller's model predicts for the current pool and load.",
            labels=["model_name"],
        )
        predicted.add_metric([m], _or(c and c.predicted_attainment, 1.0))
        goodput = GaugeMetricFamily(
            "epd:controller_observed_goodput",
            "Requests per second meeting the SLO over the controller's window.",
            labels=["model_name"],
        )
        goodput.add_metric([m], _or(c and c.observed_goodput, 0.0))
        yield from (decisions, mode, observed, predicted, goodput)


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
