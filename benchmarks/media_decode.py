"""Where media are decoded, side by side in one run: the gateway (`--media-decode gateway`, it ships
pixels) against the encode worker (the default, the gateway ships compressed bytes and a plan).
Printed, not asserted.

python -m benchmarks.media_decode [--concurrency 8] [--requests 48] [--workload image-heavy]
    [--mm-bucket '{"1280x960x1": 1}']

Each setting serves the default model as `e+p+d` on this machine and takes the same closed-loop load
(`epd bench`, the image-heavy preset: 1-3 PNG images of 224²-448² per request, unique per request).
The gateway's CPU is the user + system time of the process that listens on the HTTP port, read from
/proc before and after the load, per request; throughput and TTFT come from the load generator.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

from loadgen.cli import bench
from loadgen.server import listener_pid, start_server, stop_server
from serving.config import default_model


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure(mode: str, args: argparse.Namespace, out: Path) -> dict:
    model = str(default_model())
    flags = ["--model", model, "--topology", "e+p+d", "--media-decode", mode, "--no-prefix-caching"]
    proc, url = start_server(flags, out / f"serve-{mode}.log", timeout_s=300)
    try:
        gateway = listener_pid(int(url.rsplit(":", 1)[1]))
        before = cpu_seconds(gateway)
        ns = SimpleNamespace(
            base_url=f"{url}/v1", model=Path(model).name, api_key=None, workload=args.workload,
            image_repeat_ratio=None, mm_bucket=args.mm_bucket, rate=None, rates=None,
            concurrency=args.concurrency,
            arrival="poisson", burstiness=1.0, num_requests=args.requests, duration=None, warmup=2,
            seed=args.seed, slo="ttft=3,tpot=0.2", out=str(out / f"{mode}.json"), no_progress=True,
        )  # fmt: skip
        summary = bench(ns)[0]["summary"]
        spent = cpu_seconds(gateway) - before
    finally:
        stop_server(proc)
    return {"gateway_ms": 1000 * spent / (args.requests + 2), **summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--workload", default="image-heavy")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--mm-bucket", help="image sizes instead of the workload's, as `epd bench --mm-bucket`")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = {mode: measure(mode, args, Path(tmp)) for mode in ("gateway", "worker")}
    load = args.mm_bucket or args.workload
    print(f"\n{args.requests} {load} requests, concurrency {args.concurrency}, e+p+d:")
    print(f"{'decoded on':>12} {'gateway CPU ms/req':>19} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9}")
    for mode, r in rows.items():
        ttft = r["ttft_s"]["p50"]
        line = f"{r['gateway_ms']:19.1f} {r['request_throughput']:7.2f} {r['output_token_throughput']:10.1f}"
        print(f"{mode:>12} {line} {ttft:8.2f}s")
    g, w = rows["gateway"], rows["worker"]
    print(
        f"worker / gateway: gateway CPU {w['gateway_ms'] / g['gateway_ms']:.2f}x, "
        f"req/s {w['request_throughput'] / g['request_throughput']:.2f}x, "
        f"TTFT p50 {w['ttft_s']['p50'] / g['ttft_s']['p50']:.2f}x"
    )


if __name__ == "__main__":
    main()
