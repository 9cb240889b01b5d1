"""`epd profile`, `epd simulate` and `epd plan`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from loadgen import report as bench_report
from loadgen.arrivals import arrival_offsets
from loadgen.metrics import SLO
from loadgen.workloads import load as load_workload
from serving.controller.observation import Slo
from serving.controller.policy import Policy, PolicyConfig, role_sets
from serving.sim import report
from serving.sim.profile import Profile, measure
from serving.sim.simulator import SimConfig, Simulator
from serving.sim.workload import SimRequest, from_workload, parse_phases, shifting
from serving.types import Roles, parse_roles


def parse_workers(text: str) -> list[Roles]:
    """'e=1,p=1,d=2' or 'ep=2,d=2' → one role set per worker."""
    pool: list[Roles] = []
    for part in text.split(","):
        roles, _, count = part.partition("=")
        n = int(count or 1)
        if n < 0:
            raise ValueError(f"negative worker count in {text!r}")
        pool.extend([parse_roles(roles)] * n)
    if not pool:
        raise ValueError("no workers")
    return pool


def topology_of(pool: list[Roles]) -> str:
    labels = {"".join(r.value for r in roles) for roles in pool}
    for name, sets in (
        ("e+p+d", {"e", "p", "d"}),
        ("ep+d", {"ep", "d"}),
        ("e+pd", {"e", "pd"}),
        ("epd", {"epd"}),
    ):
        if labels <= sets:
            return name
    return "e+p+d"


def _slo(text: str, target: float) -> Slo:
    s = SLO.parse(text)
    return Slo(s.ttft_s, s.tpot_s, target)


def _requests(args: argparse.Namespace, profile: Profile, rate: float | None) -> list[SimRequest]:
    if args.shift:
        reqs = shifting(parse_phases(args.shift), args.seed)
        return from_workload(reqs, [r.arrival or 0.0 for r in reqs], profile.tokens)
    if args.trace:
        reqs = load_workload(f"trace:{args.trace}", 0)
        first = reqs[0].arrival or 0.0
        return from_workload(reqs, [(r.arrival or 0.0) - first for r in reqs], profile.tokens)
    reqs = load_workload(args.workload, args.num_requests, args.seed)
    offsets = arrival_offsets(len(reqs), rate or 1.0, args.arrival, 1.0, args.seed)
    return from_workload(reqs, offsets, profile.tokens)


def policy_for(args: argparse.Namespace, profile: Profile, pool: list[Roles]) -> Policy | None:
    if args.controller == "off":
        return None
    cfg = PolicyConfig(role_sets=role_sets(topology_of(pool)), cooldown_s=args.cooldown, settle_s=args.window)
    return Policy(cfg, profile.costs)


def cmd_profile(args: argparse.Namespace) -> None:
    from serving.cli import _model_dir

    profile = measure(_model_dir(args.model), threads=args.threads, quick=args.quick)
    profile.save(args.out)
    c = profile.costs
    print(f"profile of {profile.model} on {profile.machine} -> {args.out}")
    print(f"  encode  {c.encode_base_s * 1e3:.2f} ms + {c.encode_per_token_s * 1e6:.2f} us/image token")
    print(f"  prefill {c.prefill_base_s * 1e3:.2f} ms + {c.prefill_per_token_s * 1e6:.2f} us/token")
    print(
        f"  decode  {c.decode_base_s * 1e3:.2f} ms/step"
        f" + {c.decode_per_seq_s * 1e3:.3f} ms per extra sequence"
    )
    print(f"  transfer E->P {c.e2p_s * 1e3:.2f} ms, P->D {c.p2d_s * 1e3:.2f} ms (typical sizes)")


def cmd_simulate(args: argparse.Namespace) -> None:
    profile = Profile.load(args.profile)
    pool = parse_workers(args.workers)
    slo = _slo(args.slo, args.target)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    runs = []
    for rate in rates:
        requests = _requests(args, profile, rate)
        sim = Simulator(
            SimConfig(profile.costs, slo, args.tick, args.window, args.seed, args.cores),
            pool,
            policy_for(args, profile, pool),
            args.controller,
        )
        start = time.perf_counter()
        result = sim.run(requests)
        wall = time.perf_counter() - start
        label = {"rate": rate} if not (args.trace or args.shift) else {"trace": True}
        title = (
            ", ".join(f"{k} {v}" for k, v in label.items())
            + f", workers {args.workers}, controller {args.controller}"
        )
        print(report.text(result, slo, title))
        print(
            f"simulated {result.duration_s:.0f} s in {wall:.2f} s "
            f"({result.duration_s / max(wall, 1e-9):.0f}x real time, {result.events} events)"
        )
        entry = bench_report.run_entry(label, report.summary(result, slo), report.to_records(result.records))
        entry["decisions"] = [d.as_dict() for d in result.decisions]
        entry["windows"] = report.windows(result.records, slo)
        runs.append(entry)
    if args.rates:
        best = bench_report.best_rate(runs, args.target)
        print(
            f"highest rate with SLO attainment >= {args.target:.0%}: "
            f"{best if best is not None else 'none of the rates'}"
        )
    if args.out:
        bench_report.write(args.out, runs)


def cmd_plan(args: argparse.Namespace) -> None:
    from serving.sim.planner import plan

    profile = Profile.load(args.profile)
    slo = _slo(args.slo, args.target)
    topologies = tuple(args.topology) if args.topology else ()
    start = time.perf_counter()
    found = plan(args.workload, args.workers, profile.costs, profile.tokens, slo, args.duration, topologies)
    print(
        f"goodput (highest rate with >= {slo.attainment:.0%} attainment, TTFT <= {slo.ttft_s} s, "
        f"TPOT <= {slo.tpot_s} s), {args.workers} workers, workload {args.workload}:"
    )
    print(f"{'rank':>4}  {'topology':<7} {'split':<16} {'goodput req/s':>13} {'attainment':>10}")
    for i, p in enumerate(found[: args.top], 1):
        print(
            f"{i:>4}  {p.split.topology:<7} {p.split.label():<16} "
            f"{p.goodput_rate:>13.2f} {p.attainment:>10.1%}"
        )
    print(f"({len(found)} splits simulated in {time.perf_counter() - start:.1f} s)")
    if args.out:
        rows = [
            {
                "topology": p.split.topology,
                "split": p.split.label(),
                "goodput": p.goodput_rate,
                "attainment": p.attainment,
            }
            for p in found
        ]
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


def add_sim_parsers(sub: argparse._SubParsersAction) -> None:
    prof = sub.add_parser("profile", help="measure the engine on this machine for the simulator")
    prof.add_argument("--model", help="model directory (default: the built-in epd-tiny)")
    prof.add_argument("--out", default="profile.json")
    prof.add_argument("--threads", type=int, default=1, help="torch threads (what one worker gets)")
    prof.add_argument("--quick", action="store_true", help="fewer points (tests)")
    prof.set_defaults(func=cmd_profile)

    sim = sub.add_parser("simulate", help="simulate E/P/D pools (and the controller) on a profile")
    sim.add_argument("--profile", required=True)
    src = sim.add_mutually_exclusive_group()
    src.add_argument("--workload", default="image-heavy", help="image-heavy | mixed | text")
    src.add_argument("--trace", help="JSONL trace, as `epd bench --workload trace:FILE` takes")
    src.add_argument(
        "--shift", help="shifting mix, e.g. 'text:2:60,image-heavy:4:60' (workload:rate:seconds)"
    )
    sim.add_argument("--workers", default="e=1,p=1,d=2", help="e.g. e=1,p=1,d=2 or ep=2,d=2 or epd=4")
    sim.add_argument("--controller", choices=["off", "advisory", "on"], default="off")
    load = sim.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, default=1.0)
    load.add_argument("--rates", help="sweep, e.g. 0.5,1,2,4")
    sim.add_argument("--arrival", choices=["poisson", "gamma", "constant"], default="poisson")
    sim.add_argument("--num-requests", type=int, default=500)
    sim.add_argument("--slo", default="ttft=2,tpot=0.2")
    sim.add_argument("--target", type=float, default=0.9, help="attainment target")
    sim.add_argument("--tick", type=float, default=2.0, help="controller tick, seconds")
    sim.add_argument("--window", type=float, default=20.0, help="observation window, seconds")
    sim.add_argument("--cooldown", type=float, default=10.0, help="controller cooldown after an action")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--cores", type=float, help="CPUs all workers share (a CPU deployment); default: one device each"
    )
    sim.add_argument("--out", help="write the JSON report (epd bench's format) here")
    sim.set_defaults(func=cmd_simulate)

    pl = sub.add_parser("plan", help="the goodput-optimal static E:P:D split for a workload, by simulation")
    pl.add_argument("--profile", required=True)
    pl.add_argument("--workload", default="image-heavy")
    pl.add_argument("--workers", type=int, required=True)
    pl.add_argument("--slo", default="ttft=2,tpot=0.2")
    pl.add_argument("--target", type=float, default=0.9)
    pl.add_argument("--topology", action="append", choices=["e+p+d", "ep+d", "e+pd", "epd"])
    pl.add_argument("--duration", type=float, default=60.0, help="simulated seconds per trial")
    pl.add_argument("--top", type=int, default=5)
    pl.add_argument("--out")
    pl.set_defaults(func=cmd_plan)
