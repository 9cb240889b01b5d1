"""Cluster wiring: start (or join) Ray, create the worker pools of a topology, introduce the workers'
transport endpoints to each other once, and expose the pipeline as a Python API."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.config import EngineConfig, WorkerConfig
from serving.pipeline import TOPOLOGIES, Pipeline, Request
from serving.stages.handles import LocalHandle, Pool, RayHandle, WorkerHandle
from serving.types import FinishReason, PromptSpec, SamplingParams, TokenDelta

_ids = itertools.count()


@dataclass
class Result:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    timings: dict[str, float]
    error: str | None = None


def pool_sizes(topology: str, encode: int, prefill: int, decode: int) -> dict[str, int]:
    """Workers per role set: a set that prefills (p, ep, pd, epd) takes the --prefill count."""
    return {
        roles: prefill if "p" in roles else encode if roles == "e" else decode
        for roles in TOPOLOGIES[topology]
    }


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


class Cluster:
    def __init__(
        self, topology: str, handles: list[WorkerHandle], ray_started: bool, local_workers: list
    ) -> None:
        self.topology = topology
        self.handles = handles
        pools = {
            roles: Pool(roles, [h for h in handles if h.roles == roles]) for roles in TOPOLOGIES[topology]
        }
        self.pipeline = Pipeline(topology, pools)
        self._ray_started = ray_started
        self._local_workers = local_workers

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
    ) -> Cluster:
        """Start the pools of `topology`. runtime "ray": one actor per worker, NIXL between them;
        "local": workers in this process with the in-process transport."""
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; choose from {sorted(TOPOLOGIES)}")
        engine_cfg = EngineConfig(model=model, **(engine or {}))
        cluster_id = f"{os.getpid()}-{next(_ids)}"
        configs = [
            WorkerConfig(
                name=f"{roles}-{i}-{cluster_id}",
                roles=roles,
                engine=engine_cfg,
                transport="nixl" if runtime == "ray" else "inproc",
                cpus=worker_cpus((cpus or {}).get(roles), i, n),
                **(worker or {}),
            )
            for roles, n in pool_sizes(topology, encode, prefill, decode).items()
            for i in range(n)
        ]
        if runtime == "local":
            return cls._start_local(topology, configs)
        return cls._start_ray(topology, configs, address, namespace)

    @classmethod
    def _start_local(cls, topology: str, configs: list[WorkerConfig]) -> Cluster:
        from serving.stages.worker import StageWorker
        from serving.transport.inproc import InProcessHub

        hub = InProcessHub()
        workers = [StageWorker(c, hub=hub) for c in configs]
        infos = [w.info() for w in workers]
        for w in workers:
            for info in infos:
                if info["name"] != w.name:
                    w.add_peer(info["metadata"])
        return cls(topology, [LocalHandle(w) for w in workers], False, workers)

    @classmethod
    def _start_ray(
        cls, topology: str, configs: list[WorkerConfig], address: str | None, namespace: str | None
    ) -> Cluster:
        import ray
        import torch

        from serving.stages.worker import StageWorker

        started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.WARNING,
                "namespace": namespace,
            }
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = max(4, os.cpu_count() or 1)
            ray.init(**kwargs)
            started = True
        gpu = torch.cuda.is_available()
        actor_cls = ray.remote(StageWorker)
        actors = [
            actor_cls.options(
                name=c.name, num_cpus=0 if gpu else 0.5, num_gpus=1 if gpu else 0, max_concurrency=256
            ).remote(c)
            for c in configs
        ]
        infos = ray.get([a.info.remote() for a in actors])
        ray.get(
            [
                a.add_peer.remote(info["metadata"])
                for a, c in zip(actors, configs, strict=True)
                for info in infos
                if info["name"] != c.name
            ]
        )
        handles = [RayHandle(a, c.name, c.roles) for a, c in zip(actors, configs, strict=True)]
        return cls(topology, handles, started, [])

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
        self, spec: PromptSpec, params: SamplingParams, images: list[np.ndarray] | None = None
    ) -> Result:
        """Run one request to the end and gather its tokens, text and timings."""
        tokens: list[int] = []
        text: list[str] = []
        last = None
        request_id = f"req-{next(_ids)}"
        async for delta in self.submit(spec, params, images, request_id):
            tokens.extend(delta.token_ids)
            text.append(delta.text)
            last = delta
        assert last is not None and last.finish_reason is not None
        return Result(request_id, tokens, "".join(text), last.finish_reason, last.extra, last.error)

    def generate(self, requests: list[tuple[PromptSpec, SamplingParams, list[np.ndarray]]]) -> list[Result]:
        """Run requests concurrently to the end (a blocking convenience for the CLI and tests)."""

        async def run_all() -> list[Result]:
            return list(await asyncio.gather(*(self.collect(*r) for r in requests)))

        return asyncio.run(run_all())

    async def stats(self) -> dict[str, dict[str, float]]:
        values = await asyncio.gather(*(h.call("stats") for h in self.handles))
        return {h.name: v for h, v in zip(self.handles, values, strict=True)}

    def shutdown(self) -> None:
        for w in self._local_workers:
            w.shutdown()
        if self._ray_started:
            import ray

            ray.shutdown()
