"""Several gateway replicas, one exposition: each replica's request series labelled with its gateway,
families merged by name (one HELP and TYPE each), values and histogram buckets as each replica had them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.telemetry.replicas import merge_replicas


def exposition(successes: int, latency: float) -> bytes:
    registry = CollectorRegistry()
    counter = Counter("epd:request_success", "Finished requests.", ["model_name"], registry=registry)
    counter.labels("m").inc(successes)
    hist = Histogram("epd:e2e_seconds", "Latency.", ["model_name"], buckets=(0.1, 1.0), registry=registry)
    hist.labels("m").observe(latency)
    return generate_latest(registry)


def test_every_replica_series_labelled_by_its_gateway_in_one_family():
    text = merge_replicas({"a": exposition(3, 0.05), "b": exposition(4, 0.5)}).decode()
    assert text.count("# TYPE epd:request_success_total counter") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    successes = {s.labels["gateway"]: s.value for s in families["epd:request_success"].samples}
    assert successes == {"a": 3.0, "b": 4.0}
    buckets = {
        (s.labels["gateway"], s.labels["le"]): s.value
        for s in families["epd:e2e_seconds"].samples
        if s.name.endswith("_bucket")
    }
    assert buckets[("a", "0.1")] == 1.0 and buckets[("b", "0.1")] == 0.0 and buckets[("b", "1.0")] == 1.0
    assert all(s.labels["model_name"] == "m" for f in families.values() for s in f.samples)
