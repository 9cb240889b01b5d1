"""`epd bench` / `python -m loadgen`: run a workload against a server, sweep rates, or plot reports."""

from __future__ import annotations

import argparse
import asyncio
import sys

from loadgen import report, workloads
from loadgen.arrivals import arrival_offsets
from loadgen.client import Target, run
from loadgen.metrics import SLO, summarize


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="epd bench", description="Load-test an OpenAI-compatible server.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="epd-tiny")
    p.add_argument("--api-key")
    p.add_argument(
        "--workload",
        default="image-heavy",
        help="image-heavy | mixed | text | shapes | video | trace:PATH.jsonl",
    )
    p.add_argument(
        "--mm-bucket",
        help='image and video sizes by weight, e.g. \'{"224x224x1": 0.5, "336x336x16": 0.5}\' (WxHxFRAMES)',
    )
    p.add_argument("--image-repeat-ratio", type=float, help="share of images reused (embedding cache hits)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="open loop: mean requests per second")
    load.add_argument("--rates", help="open-loop sweep, e.g. 0.5,1,2,4")
    load.add_argument("--concurrency", type=int, help="closed loop: requests in flight")
    p.add_argument("--arrival", choices=["poisson", "gamma", "constant"], default="poisson")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 is Poisson")
    p.add_argument("--num-requests", type=int, default=50)
    p.add_argument("--duration", type=float, help="stop sending after this many seconds")
    p.add_argument("--warmup", type=int, default=2, help="requests sent first and left out of the figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", default="ttft=2,tpot=0.2", help="targets, e.g. ttft=2,tpot=0.2 (seconds)")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true")
    return p


def bench(args: argparse.Namespace) -> list[dict]:
    target = Target(args.base_url.rstrip("/"), args.model, args.api_key)
    slo = SLO.parse(args.slo)
    requests = workloads.load(
        args.workload, args.num_requests + args.warmup, args.seed, args.image_repeat_ratio, args.mm_bucket
    )
    traced = requests[0].arrival is not None
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [args.rate]
    runs = []
    for rate in rates:
        if args.concurrency or (rate is None and not traced):
            offsets, label = None, {"concurrency": args.concurrency or 1}
        elif traced:
            offsets, label = (
                [r.arrival - requests[args.warmup].arrival for r in requests[args.warmup :]],
                {"trace": True},
            )
        else:
            offsets = arrival_offsets(
                len(requests) - args.warmup, rate, args.arrival, args.burstiness, args.seed
            )
            label = {"rate": rate, "arrival": args.arrival}
        records = asyncio.run(
            run(
                target,
                requests,
                offsets,
                args.concurrency or (1 if offsets is None else None),
                args.warmup,
                args.duration,
                not args.no_progress,
            )
        )
        summary = summarize(records, slo)
        print(report.table(summary, ", ".join(f"{k} {v}" for k, v in label.items())))
        runs.append(report.run_entry(label, summary, records))
    if args.rates:
        best = report.best_rate(runs)
        print(
            f"highest rate with SLO attainment >= 90 %: {best if best is not None else 'none of the rates'}"
        )
    if args.out:
        report.write(args.out, runs)
    return runs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        p = argparse.ArgumentParser(prog="epd bench plot", description="Plot reports as PNGs.")
        p.add_argument("reports", nargs="+")
        p.add_argument("--out", required=True)
        args = p.parse_args(argv[1:])
        from loadgen.plot import plot

        for path in plot(args.reports, args.out):
            print(path)
        return
    bench(run_parser().parse_args(argv))
