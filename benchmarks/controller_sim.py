"""The controller in the simulator (printed, not asserted), on a profile measured on this machine:

1. a trace whose mix shifts midway (text with long outputs → image-heavy with short ones), at 64 and
   at 1,000 workers: the controller against the best static split for the first phase and against
   a P/D-only re-balancer with a fixed encode pool (what Dynamo's planner moves); goodput ratios;
2. the simulator's speed at 1,000 workers with the live policy;
3. η_scale = attainment(k·M | k·H) / attainment(M | H) for k = 1, 4, 16, 64 (load and workers
   scaled together, controller on).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

from serving.controller.observation import Slo
from serving.controller.policy import Policy, PolicyConfig, role_sets
from serving.sim.planner import Split, goodput, splits
from serving.sim.profile import Profile
from serving.sim.report import recovery_s
from serving.sim.simulator import SimConfig, SimResult, Simulator
from serving.sim.workload import Phase, SimRequest, from_workload, shifting
from serving.types import Roles, parse_roles

BASE_WORKERS = 4  # the split is planned at this size and scaled by k


@dataclass(frozen=True)
class Scenario:
    text_rate: float  # per BASE_WORKERS workers
    image_rate: float
    phase_s: float
    slo: Slo


def trace(sc: Scenario, k: float, profile: Profile, seed: int = 0) -> list[SimRequest]:
    phases = [
        Phase("text", sc.text_rate * k, sc.phase_s),
        Phase("image-heavy", sc.image_rate * k, sc.phase_s),
    ]
    reqs = shifting(phases, seed)
    return from_workload(reqs, [r.arrival or 0.0 for r in reqs], profile.tokens)


def best_first_phase(sc: Scenario, profile: Profile) -> Split:
    """The goodput-optimal e+p+d split of BASE_WORKERS for the first phase, keeping one encode worker
    (the deployment serves images too)."""
    found = [
        goodput(s, "text", profile.costs, profile.tokens, sc.slo, duration_s=60, iterations=8)
        for s in splits(BASE_WORKERS, images=True)
        if s.topology == "e+p+d"
    ]
    return max(found, key=lambda p: p.goodput_rate).split


def arm(
    pool: list[Roles], reqs: list[SimRequest], profile: Profile, slo: Slo, policy: Policy | None
) -> tuple[SimResult, float]:
    sim = Simulator(SimConfig(profile.costs, slo, tick_s=2.0, window_s=20.0), pool, policy)
    start = time.perf_counter()
    result = sim.run(reqs)
    return result, time.perf_counter() - start


def met_share(result: SimResult, n: int, slo: Slo) -> float:
    return sum(r.met(slo) for r in result.records) / n


def compare(sc: Scenario, profile: Profile, split: Split, k: int) -> None:
    pool = [roles for roles in split.pool for _ in range(k)]
    reqs = trace(sc, k, profile)
    duration = 2 * sc.phase_s
    cfg = PolicyConfig(role_sets=role_sets("e+p+d"))
    arms = {
        "best static (phase 1)": None,
        "P/D-only, fixed E": Policy(
            PolicyConfig(role_sets=role_sets("e+p+d"), fixed=parse_roles("e")), profile.costs
        ),
        "controller": Policy(cfg, profile.costs),
    }
    print(f"\n{len(pool)} workers ({split.label()} x{k}), {len(reqs)} requests, shift at {sc.phase_s:.0f} s:")
    print(
        f"  {'arm':<24}{'attainment':>11}{'goodput r/s':>12}{'phase 2 att.':>13}"
        f"{'recovery s':>11}{'actions':>8}{'wall s':>8}"
    )
    good = {}
    for name, policy in arms.items():
        result, wall = arm(pool, reqs, profile, sc.slo, policy)
        met = sum(r.met(sc.slo) for r in result.records)
        second = [r for r in result.records if r.arrival >= sc.phase_s]
        n2 = sum(1 for r in reqs if r.arrival >= sc.phase_s)
        phase2 = sum(r.met(sc.slo) for r in second) / max(n2, 1)
        rec = recovery_s(result.records, sc.slo, sc.phase_s)
        good[name] = met / duration
        applied = sum(1 for d in result.decisions if d.applied)
        rec_text = "never" if math.isinf(rec) else f"{rec:.0f}"
        print(
            f"  {name:<24}{met / len(reqs):>10.1%}{met / duration:>12.2f}{phase2:>12.1%}"
            f"{rec_text:>11}{applied:>8}{wall:>8.1f}"
        )
    c = good["controller"]
    print(
        f"  goodput ratio: controller / best static {c / max(good['best static (phase 1)'], 1e-9):.2f}x, "
        f"controller / P-D-only {c / max(good['P/D-only, fixed E'], 1e-9):.2f}x"
    )


def eta(sc: Scenario, profile: Profile, split: Split, ks: tuple[int, ...]) -> None:
    print("\nη_scale = attainment(k·M | k·H) / attainment(M | H), controller on:")
    base = None
    for k in ks:
        pool = [roles for roles in split.pool for _ in range(k)]
        reqs = trace(sc, k, profile)
        result, wall = arm(
            pool, reqs, profile, sc.slo, Policy(PolicyConfig(role_sets=role_sets("e+p+d")), profile.costs)
        )
        att = met_share(result, len(reqs), sc.slo)
        base = base if base is not None else att
        speed = result.duration_s / wall
        print(
            f"  k={k:<3} workers {len(pool):>5}  attainment {att:6.1%}  η {att / base:5.2f}  "
            f"({wall:.1f} s wall, {speed:.0f}x real time, {result.events} events)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--profile", required=True)
    p.add_argument("--slo", default="ttft=3,tpot=0.1")
    p.add_argument("--text-rate", type=float, default=4.0, help="req/s per 4 workers, phase 1")
    p.add_argument("--image-rate", type=float, default=2.5, help="req/s per 4 workers, phase 2")
    p.add_argument("--phase", type=float, default=120.0, help="seconds per phase")
    p.add_argument("--quick", action="store_true", help="64 workers only; η up to k=16")
    args = p.parse_args()
    profile = Profile.load(args.profile)
    ttft, tpot = (float(v.split("=")[1]) for v in args.slo.split(","))
    sc = Scenario(args.text_rate, args.image_rate, args.phase, Slo(ttft, tpot))
    split = best_first_phase(sc, profile)
    print(f"profile {args.profile} ({profile.machine}); SLO TTFT <= {ttft} s, TPOT <= {tpot} s, target 90 %")
    print(f"best static split for phase 1 (text, {BASE_WORKERS} workers, >= 1 encode): {split.label()}")
    compare(sc, profile, split, 16)
    if not args.quick:
        compare(sc, profile, split, 250)
    eta(sc, profile, split, (1, 4, 16) if args.quick else (1, 4, 16, 64))


if __name__ == "__main__":
    main()
