"""The controller on a live server (printed, not asserted), small preset, this machine, one run:
a trace that shifts midway from text with long outputs to image-heavy with short ones, replayed
against the best static split for the first phase with the controller off and then on (same initial
split, same CPUs), next to the simulator's prediction of both runs from a profile measured here.

Prints SLO attainment per 10 s window, goodput over the run, time back to ≥ 90 % attainment after
the shift, and P50/P99 TTFT and TPOT, live and simulated side by side (the simulator's error)."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import httpx

from loadgen.cli import bench
from loadgen.client import Record
from loadgen.metrics import SLO, summarize
from loadgen.server import start_server, stop_server
from serving.controller.observation import Kind, RequestRecord, Slo
from serving.controller.policy import Policy, PolicyConfig, role_sets
from serving.sim.cli import parse_workers
from serving.sim.profile import Profile, measure
from serving.sim.report import recovery_s, to_records, windows
from serving.sim.simulator import SimConfig, Simulator
from serving.sim.workload import Phase, from_workload, parse_phases, shifting, write_trace


def as_records(records: list[Record]) -> list[RequestRecord]:
    """Client records as the controller's records, times from the first arrival."""
    measured = [r for r in records if not r.warmup]
    t0 = min(r.arrival for r in measured)
    out = []
    for r in measured:
        first = None if r.first_token is None else r.first_token - r.arrival
        n = r.output_tokens
        tpot = (r.end - r.first_token) / (n - 1) if r.first_token is not None and n > 1 else None
        kind = Kind.IMAGE if r.images else Kind.TEXT
        out.append(
            RequestRecord(
                r.arrival - t0,
                (r.end or r.arrival) - t0,
                kind,
                r.prompt_tokens,
                0,
                n,
                first,
                tpot,
                r.error is None,
            )
        )
    return out


def live(model: str, workers: str, trace: Path, slo_text: str, extra: list[str], label: str) -> list[Record]:
    counts = dict(part.split("=") for part in workers.split(","))
    args = ["--model", model, "--topology", "e+p+d", "--encode", counts.get("e", "1")]
    args += ["--prefill", counts.get("p", "1"), "--decode", counts.get("d", "1")]
    slo = SLO.parse(slo_text)
    args += ["--slo-ttft", str(slo.ttft_s), "--slo-tpot", str(slo.tpot_s), *extra]
    log = Path(tempfile.gettempdir()) / f"epd-bench-controller-{label}.log"
    proc, url = start_server(args, log, timeout_s=600)
    try:
        ns = SimpleNamespace(
            base_url=f"{url}/v1", model=Path(model).name, api_key=None, workload=f"trace:{trace}",
            image_repeat_ratio=None, mm_bucket=None, rate=None, rates=None, concurrency=None,
            arrival="poisson",
            burstiness=1.0, num_requests=0, duration=None, warmup=0, seed=0, slo=slo_text, out=None,
            no_progress=True,
        )  # fmt: skip
        print(f"\n######## live: {label} ########", flush=True)
        runs = bench(ns)
        for d in httpx.get(f"{url}/admin/decisions", timeout=30).json()["decisions"]:
            print(
                f"live controller: {d['kind']} {d.get('worker') or ''} -> {d.get('roles')}: "
                f"{d['outcome']}; {d['reason']}"
            )
        return [Record(**r) for r in runs[0]["records"]]
    finally:
        stop_server(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="small")
    p.add_argument("--profile", help="an `epd profile` of the model on this machine (measured if absent)")
    p.add_argument("--workers", default="e=1,p=2,d=1", help="the initial split (best for phase 1)")
    p.add_argument("--shift", default="text:0.5:60,image-heavy:0.5:60", help="workload:rate:seconds phases")
    p.add_argument("--slo", default="ttft=4,tpot=0.15")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cores", type=float, default=os.cpu_count(), help="CPUs the simulated workers share")
    args = p.parse_args()
    from serving.config import default_model_dir
    from serving.engine.models.builder import ensure_model

    model = str(ensure_model(default_model_dir(args.preset), args.preset))
    out = Path(tempfile.mkdtemp(prefix="epd-bench-controller-"))
    if args.profile:
        profile = Profile.load(args.profile)
        profile_path = args.profile
    else:
        print("measuring the engine (epd profile) ...", flush=True)
        profile = measure(model)
        profile_path = str(out / "profile.json")
        profile.save(profile_path)
    phases: list[Phase] = parse_phases(args.shift)
    requests = shifting(phases, args.seed)
    trace = out / "trace.jsonl"
    write_trace(requests, trace)
    shift_at = phases[0].duration_s
    s = SLO.parse(args.slo)
    slo = Slo(s.ttft_s, s.tpot_s)
    controller = ["--controller", "on", "--controller-profile", profile_path]
    measured = {
        "static": as_records(live(model, args.workers, trace, args.slo, [], "static")),
        "controller": as_records(live(model, args.workers, trace, args.slo, controller, "controller")),
    }
    sim_reqs = from_workload(requests, [r.arrival or 0.0 for r in requests], profile.tokens)
    pool = parse_workers(args.workers)
    simulated = {}
    for name, policy in (
        ("static", None),
        ("controller", Policy(PolicyConfig(role_sets=role_sets("e+p+d")), profile.costs)),
    ):
        result = Simulator(SimConfig(profile.costs, slo, seed=args.seed, cores=args.cores), pool, policy).run(
            sim_reqs
        )
        simulated[name] = result.records
        if policy is not None:
            for d in result.decisions:
                print(f"sim controller t={d.at:.0f} s: {d.action.describe()}")
    report(measured, simulated, slo, shift_at, len(requests))


def report(measured: dict, simulated: dict, slo: Slo, shift_at: float, n: int) -> None:
    arms = [
        (f"{kind} {name}", recs)
        for kind, group in (("live", measured), ("sim", simulated))
        for name, recs in group.items()
    ]
    print(f"\nSLO attainment per 10 s window (shift at {shift_at:.0f} s):")
    print("window  " + "".join(f"{name:>17}" for name, _ in arms))
    table = {name: {t: a for t, a, _ in windows(recs, slo)} for name, recs in arms}
    for t in sorted({t for rows in table.values() for t in rows}):
        print(f"{t:>4.0f} s " + "".join(f"{table[name].get(t, math.nan):>16.0%} " for name, _ in arms))
    print(
        f"\n{'':<17}{'attainment':>11}{'goodput r/s':>12}{'recovery s':>11}"
        f"{'TTFT p50':>9}{'TTFT p99':>9}{'TPOT p50':>9}{'TPOT p99':>9}"
    )
    for name, recs in arms:
        summary = summarize(to_records(recs), SLO(slo.ttft_s, slo.tpot_s))
        met = sum(r.met(slo) for r in recs)
        span = max((r.end for r in recs), default=1.0)
        rec = recovery_s(recs, slo, shift_at)
        t, tp = summary["ttft_s"], summary["tpot_s"]
        print(
            f"{name:<17}{met / n:>10.1%}{met / span:>12.3f}{'never' if math.isinf(rec) else f'{rec:.0f}':>11}"
            f"{t['p50']:>9.2f}{t['p99']:>9.2f}{tp['p50'] * 1e3:>8.0f}m{tp['p99'] * 1e3:>8.0f}m"
        )


if __name__ == "__main__":
    main()
