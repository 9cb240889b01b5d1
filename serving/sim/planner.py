"""`epd plan`: the goodput-optimal static split of N workers for a workload, by simulation.

Goodput is DistServe's: the highest arrival rate at which ≥ 90 % of requests meet both SLO targets,
found by bisection over simulated Poisson runs, for every E:P:D split of every topology."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from loadgen.workloads import load as load_workload
from serving.controller.model import StageCosts
from serving.controller.observation import Slo
from serving.sim.simulator import SimConfig, Simulator
from serving.sim.workload import SimRequest, Tokens, from_workload
from serving.types import Roles, parse_roles, roles_label


@dataclass(frozen=True)
class Split:
    topology: str
    pool: tuple[Roles, ...]

    def label(self) -> str:
        counts: dict[str, int] = {}
        for roles in self.pool:
            counts[roles_label(roles)] = counts.get(roles_label(roles), 0) + 1
        return ",".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: "epd".find(kv[0][0])))


@dataclass(frozen=True)
class Planned:
    split: Split
    goodput_rate: float  # highest rate (req/s) with attainment ≥ target
    attainment: float  # at that rate


def splits(workers: int, images: bool = True) -> Iterator[Split]:
    e, p, d = parse_roles("e"), parse_roles("p"), parse_roles("d")
    for ne in range(1 if images else 0, workers - 1):
        for np_ in range(1, workers - ne):
            nd = workers - ne - np_
            if nd >= 1:
                yield Split("e+p+d", (e,) * ne + (p,) * np_ + (d,) * nd)
    for k in range(1, workers):
        yield Split("ep+d", (parse_roles("ep"),) * k + (d,) * (workers - k))
        if images:
            yield Split("e+pd", (e,) * k + (parse_roles("pd"),) * (workers - k))
    yield Split("epd", (parse_roles("epd"),) * workers)


def requests_at(
    workload: str, rate: float, duration_s: float, tokens: Tokens, seed: int = 0
) -> list[SimRequest]:
    n = max(int(rate * duration_s), 20)
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    return from_workload(load_workload(workload, n, seed), arrivals.tolist(), tokens)


def attainment(
    split: Split,
    workload: str,
    rate: float,
    costs: StageCosts,
    tokens: Tokens,
    slo: Slo,
    duration_s: float,
    seed: int = 0,
) -> float:
    sim = Simulator(SimConfig(costs, slo, seed=seed), split.pool)
    result = sim.run(requests_at(workload, rate, duration_s, tokens, seed))
    recs = result.records
    n = max(int(rate * duration_s), 20)
    return sum(r.met(slo) for r in recs) / n  # unfinished requests count as misses


def goodput(
    split: Split,
    workload: str,
    costs: StageCosts,
    tokens: Tokens,
    slo: Slo,
    duration_s: float = 60.0,
    iterations: int = 10,
) -> Planned:
    """Bisection on the rate (attainment falls as the rate grows)."""
    lo, hi = 0.0, 1.0
    while attainment(split, workload, hi, costs, tokens, slo, duration_s) >= slo.attainment and hi < 1e5:
        lo, hi = hi, hi * 2
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if attainment(split, workload, mid, costs, tokens, slo, duration_s) >= slo.attainment:
            lo = mid
        else:
            hi = mid
    att = attainment(split, workload, lo, costs, tokens, slo, duration_s) if lo > 0 else 0.0
    return Planned(split, lo, att)


def plan(
    workload: str,
    workers: int,
    costs: StageCosts,
    tokens: Tokens,
    slo: Slo,
    duration_s: float = 60.0,
    topologies: tuple[str, ...] = (),
) -> list[Planned]:
    images = workload != "text"
    found = [
        goodput(s, workload, costs, tokens, slo, duration_s)
        for s in splits(workers, images)
        if not topologies or s.topology in topologies
    ]
    return sorted(found, key=lambda p: (-p.goodput_rate, p.split.label()))
