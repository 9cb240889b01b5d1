"""A deployment as a Python object: start (or join) Ray, start the workers of a topology, and run
requests through the control plane's pipeline. Used by `epd generate`, the benchmarks and the tests;
`epd serve` starts the same workers and hands them to the deployment's control actor instead.

Layering: this module sits above the pipeline and the control plane; they never import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.config import ControlConfig, EngineConfig, WorkerConfig
from serving.control.plane import ControlPlane
from serving.pipeline import Request
from serving.stages.factory import LocalWorkerFactory, RayWorkerFactory, WorkerFactory, worker_name
from serving.types import (
    FinishReason,
    PromptSpec,
    Roles,
    SamplingParams,
    StageTimings,
    TokenDelta,
    WorkerPhase,
    WorkerStats,
    parse_roles,
)

_ids = itertools.count()

TOPOLOGIES: dict[str, tuple[str, ...]] = {
    # topology → the role sets of its workers at start
    "e+p+d": ("e", "p", "d"),
    "ep+d": ("ep", "d"),
    "e+pd": ("e", "pd"),
    "epd": ("epd",),
}


@dataclass
class Result:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    timings: StageTimings
    error: str | None = None


@dataclass(frozen=True)
class WorkerPlan:
    name: str
    roles: Roles
    cpus: tuple[int, ...] = ()


def pool_sizes(topology: str, encode: int, prefill: int, decode: int) -> dict[str, int]:
    """Workers per role set: a set that prefills (p, ep, pd, epd) takes the --prefill count."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}; choose from {sorted(TOPOLOGIES)}")
    sizes = {
        roles: prefill if "p" in roles else encode if roles == "e" else decode
        for roles in TOPOLOGIES[topology]
    }
    # A pool of none could never serve its stage: refused here rather than found out by requests.
    flags = {"e": "--encode", "d": "--decode"}
    for roles, n in sizes.items():
        if n < 1:
            flag = "--prefill" if "p" in roles else flags[roles]
            raise ValueError(f"topology {topology} needs at least one {roles!r} worker ({flag} is {n})")
    return sizes


def worker_cpus(cpus: list[int] | None, index: int, count: int) -> tuple[int, ...]:
    """CPUs for worker `index` of `count` in a pool: one each, round robin, when there are enough for
    that; otherwise the whole list for every worker."""
    if not cpus:
        return ()
    return (cpus[index % len(cpus)],) if count > 1 and len(cpus) >= count else tuple(cpus)


def parse_cpus(spec: str) -> dict[str, list[int]]:
    """'e=0;p=0;d=1' or 'epd=0,1' → {roles: cpus}."""
    out = {}
    for part in filter(None, spec.split(";")):
        roles, cpus = part.split("=", 1)
        out[roles.strip()] = [int(c) for c in cpus.split(",")]
    return out


def spare_cpus(pins: dict[str, list[int]]) -> tuple[int, ...]:
    """The CPUs this process may use that no worker is pinned to: where the rest of a local server
    (Ray's daemons, Serve's controller, the gateway, the workers' runtime threads) runs; empty when the
    workers take every one."""
    pinned = {cpu for cpus in pins.values() for cpu in cpus}
    return tuple(sorted(os.sched_getaffinity(0) - pinned))


def plan_workers(
    topology: str,
    encode: int,
    prefill: int,
    decode: int,
    cluster_id: str,
    cpus: dict[str, list[int]] | None = None,
) -> list[WorkerPlan]:
    plans, index = [], 0
    for roles, n in pool_sizes(topology, encode, prefill, decode).items():
        for i in range(n):
            cpu = worker_cpus((cpus or {}).get(roles), i, n)
            plans.append(
                WorkerPlan(worker_name(parse_roles(roles), index, cluster_id), parse_roles(roles), cpu)
            )
            index += 1
    return plans


# Ray's own housekeeping periods for a Ray this process starts. Its defaults assume a large cluster
# with the dashboard in use; on a small idle server they were most of its CPU (measured here: under 2 % of
# a core idle once set). Failure detection keeps Ray's defaults: GCS ↔ raylet health checks
# (`health_check_period_ms`), the workers' own heartbeat, and the control plane's health monitor.
RAY_SYSTEM_CONFIG: dict[str, Any] = {
    # Task state events feed only the dashboard's task views and `ray list tasks`; every actor call
    # (one stats call per worker per second from the health monitor, one per request) sent one to
    # the GCS each second from every process. 0 turns recording and reporting off (setting
    # `enable_task_events` to false instead stops the GCS from starting in Ray 2.60).
    "task_events_report_interval_ms": 0,
    # Raylet resource reports (default every 100 ms): this node schedules against its own resources
    # directly; the period only bounds how stale other nodes' view of this one is.
    "raylet_report_resources_period_milliseconds": 1000,
    # Object-store memory pressure → global GC request (default every 100 ms).
    "raylet_check_gc_period_milliseconds": 1000,
    # The OOM killer's memory check (default every 250 ms): it still runs, reacting within a second.
    "memory_monitor_refresh_ms": 1000,
    # Reaping idle pooled Ray workers (default every 200 ms): we run a few long-lived actors.
    "kill_idle_workers_interval_ms": 1000,
    # The GCS pulls every raylet's pending resource demands for the autoscaler (default every 1 s);
    # a Ray this process starts has no autoscaler acting on them.
    "gcs_pull_resource_loads_period_milliseconds": 5000,
}
# Read from the environment by the processes Ray starts (they inherit this process's environment).
RAY_ENV: dict[str, str] = {
    # Serve's replicas and routers export their cached request metrics to Ray's metrics agent every
    # 100 ms by default; Ray itself exports every 10 s, and our Prometheus metrics are the gateway's
    # own (`/metrics`), so once a second loses nothing.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    # The dashboard agent's node stats (psutil over every process; default every 5 s) feed only
    # Ray's node metrics, which our Prometheus configuration does not scrape.
    "REPORTER_UPDATE_INTERVAL_MS": "30000",
}


def init_ray(address: str | None, namespace: str | None, host: str = "127.0.0.1") -> bool:
    """Join `address`, or start a local Ray bound to `host`; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "namespace": namespace,
    }
    if address:
        kwargs["address"] = address
        ray.init(**kwargs)
        return True
    kwargs["num_cpus"] = max(4, os.cpu_count() or 1)
    if host:
        kwargs["_node_ip_address"] = host
    kwargs["_system_config"] = RAY_SYSTEM_CONFIG
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)  # a value set by the operator wins
    with _without_log_monitor():
        ray.init(**kwargs)
    return True


@contextlib.contextmanager
def _without_log_monitor() -> Iterator[None]:
    """Start Ray without its log monitor. It re-reads every worker's log file ten times a second to
    forward new lines to drivers, and we start drivers with `log_to_driver=False`: it forwarded
    nothing and cost ~0.7 % of a core idle. Workers still write their log files (Ray's `logs/` and
    the dashboard read them directly). `ray.init` has no switch for it (`ray start` has
    `--include-log-monitor`), so the node's parameters get it as a default while Ray starts."""
    from ray._private.parameter import RayParams

    original = RayParams.__init__

    def without(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("include_log_monitor", False)
        original(self, *args, **kwargs)

    RayParams.__init__ = without  # type: ignore[method-assign]
    try:
        yield
    finally:
        RayParams.__init__ = original  # type: ignore[method-assign]


def start_ray_workers(factory: RayWorkerFactory, plans: list[WorkerPlan]) -> list[Any]:
    """Create every worker's actor at once and wait until each answers; returns their handles."""
    import ray

    from serving.stages.handles import RayHandle

    actors = [factory.actor(p.name, p.roles, p.cpus) for p in plans]
    ray.get([a.info.remote() for a in actors])
    return [RayHandle(a, p.name) for a, p in zip(actors, plans, strict=True)]


class Cluster:
    def __init__(self, plane: ControlPlane, ray_started: bool) -> None:
        self.plane = plane
        self.directory = plane.directory
        self.actuator = plane.actuator
        self.pipeline = plane.pipeline
        self._ray_started = ray_started

    @classmethod
    def start(
        cls,
        model: str,
        topology: str = "e+p+d",
        encode: int = 1,
        prefill: int = 1,
        decode: int = 1,
        runtime: str = "ray",
        address: str | None = None,
        engine: dict[str, Any] | None = None,
        worker: dict[str, Any] | None = None,
        namespace: str | None = None,
        cpus: dict[str, list[int]] | None = None,
        control: ControlConfig | None = None,
    ) -> Cluster:
        """Start the workers of `topology`. runtime "ray": one actor per worker, NIXL between them;
        "local": workers in this process with the in-process transport."""
        cluster_id = f"{os.getpid()}-{next(_ids)}"
        template = WorkerConfig(
            name="template",
            engine=EngineConfig(model=model, **(engine or {})),
            transport="nixl" if runtime == "ray" else "inproc",
            **(worker or {}),
        )
        plans = plan_workers(topology, encode, prefill, decode, cluster_id, cpus)
        started = False
        factory: WorkerFactory
        if runtime == "local":
            from serving.transport.inproc import InProcessHub

            factory = LocalWorkerFactory(template, InProcessHub())
        else:
            started = init_ray(address, namespace)
            factory = RayWorkerFactory(template, namespace, gpus_per_worker=_gpus())
        plane = ControlPlane(factory, control or ControlConfig(), _namer(cluster_id), len(plans))
        if isinstance(factory, RayWorkerFactory):
            handles = start_ray_workers(factory, plans)
        else:
            handles = [plane.run(factory.start(p.name, p.roles, p.cpus)) for p in plans]
        plane.adopt(handles, {p.name: p.cpus for p in plans})
        return cls(plane, started)

    # -- requests ---------------------------------------------------------------------------------

    def submit(
        self,
        spec: PromptSpec,
        params: SamplingParams,
        images: list[np.ndarray] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[TokenDelta]:
        request_id = request_id or f"req-{next(_ids)}"
        return self.pipeline.run(Request(request_id, spec, params, list(images or [])))

    async def collect(
        self,
        spec: PromptSpec,
        params: SamplingParams,
        images: list[np.ndarray] | None = None,
        request_id: str | None = None,
    ) -> Result:
        """Run one request to the end and gather its tokens, text and timings."""
        tokens: list[int] = []
        text: list[str] = []
        last = None
        request_id = request_id or f"req-{next(_ids)}"
        async for delta in self.submit(spec, params, images, request_id):
            tokens.extend(delta.token_ids)
            text.append(delta.text)
            last = delta
        assert last is not None and last.finish_reason is not None
        timings = last.timings or StageTimings()
        return Result(request_id, tokens, "".join(text), last.finish_reason, timings, last.error)

    def generate(self, requests: list[tuple[PromptSpec, SamplingParams, list[np.ndarray]]]) -> list[Result]:
        """Run requests concurrently to the end (a blocking convenience for the CLI and tests)."""

        async def run_all() -> list[Result]:
            return list(await asyncio.gather(*(self.collect(*r) for r in requests)))

        return asyncio.run(run_all())

    async def stats(self) -> dict[str, WorkerStats]:
        """Fresh stats of every worker that is up (not one still starting, failed or stopped)."""
        up = (WorkerPhase.ACTIVE, WorkerPhase.DRAINING, WorkerPhase.RECONFIGURING)
        entries = [e for e in self.directory.entries() if e.phase in up]
        values = await asyncio.gather(*(e.handle.stats() for e in entries))
        return {e.name: v for e, v in zip(entries, values, strict=True)}

    def stats_now(self) -> dict[str, WorkerStats]:
        return self.plane.run(self.stats())

    def shutdown(self) -> None:
        self.plane.stop()
        if self._ray_started:
            import ray

            ray.shutdown()


def _namer(cluster_id: str):  # noqa: ANN202 - a small closure
    def name_for(roles: Roles, index: int) -> str:
        return worker_name(roles, index, cluster_id)

    return name_for


def _gpus() -> int:
    import torch

    return 1 if torch.cuda.is_available() else 0
