"""What a worker's stats say about its engine, as operators read it: the pool's size in tokens and
how the CPU kernels stand, in `/admin/workers` and in `/metrics`."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest

from serving.api.admin import worker_view
from serving.control.directory import WorkerEntry
from serving.telemetry.metrics import WorkerCollector
from serving.types import WorkerPhase, parse_roles
from tests.unit.control.test_refresh_stats import stats


def test_pool_tokens_and_kernels_in_the_workers_view_and_the_metrics():
    s = replace(stats("d-1-x", 3), kv_block_size=16, backend="cpu", kernels="no-compiler")
    entry = WorkerEntry("d-1-x", None, parse_roles("d"), WorkerPhase.ACTIVE, parse_roles("d"), stats=s)
    view = worker_view(entry, 0)
    assert view["kv_tokens_total"] == 160 and view["kernels"] == "no-compiler" and view["backend"] == "cpu"
    collector = WorkerCollector("m")
    collector.stats = {"d-1-x": s}
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert 'epd:kv_cache_tokens{model_name="m",worker="d-1-x"} 160.0' in text
    assert (
        'epd:engine_backend_info{backend="cpu",kernels="no-compiler",model_name="m",worker="d-1-x"} 1.0'
        in text
    )
