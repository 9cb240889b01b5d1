"""One exposition for several gateway replicas. A scrape reaches one replica (the kernel or Serve's
proxy picks it), so each answers with every replica's request metrics, each series labelled with its
`gateway`: its own read now, the others' as they last reported them to the control actor (within a
couple of seconds). Deployment-wide series (workers, the control plane, the controller) are not
per replica and are not labelled."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

GATEWAY_LABEL = "gateway"


def merge_replicas(expositions: Mapping[str, bytes]) -> bytes:
    """The text format of every replica's families, merged by name; samples gain `gateway`."""
    families: dict[str, Metric] = {}
    for gateway, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                labels = {**sample.labels, GATEWAY_LABEL: gateway}
                merged.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families
