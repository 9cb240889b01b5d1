"""Control-plane benchmark (printed, not asserted), small preset, one run on this machine:
the time of a role switch (drain + resize + re-register) with 0, 8 and 32 requests in flight, P99
TPOT in the 2 s around a switch against before it, and the extra latency of a request whose decode
worker is killed mid-stream (it migrates) against the same request undisturbed."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time

from serving.cluster import Cluster
from serving.config import ControlConfig, default_model_dir
from serving.engine.inputs import InputProcessor
from serving.engine.models.builder import ensure_model
from serving.pipeline import Request
from serving.types import Role, SamplingParams, parse_roles


async def stream(cluster: Cluster, request: Request, times: list[float]) -> float:
    """Run a request, appending each token's arrival time; returns its e2e seconds."""
    start = time.perf_counter()
    async for delta in cluster.pipeline.run(request):
        times.extend([time.perf_counter()] * len(delta.token_ids))
    return time.perf_counter() - start


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else float("nan")


async def switch_under_load(cluster: Cluster, spec, in_flight: int, tag: str) -> tuple[float, float, float]:
    """Switch a decode worker to prefill (and back) with `in_flight` streams running; returns switch
    seconds, P99 inter-token gap before, and within 1 s either side of the switch."""
    params = SamplingParams(max_tokens=96, ignore_eos=True)
    token_times: list[list[float]] = [[] for _ in range(in_flight)]
    tasks = [
        asyncio.create_task(stream(cluster, Request(f"{tag}-{i}", spec, params), token_times[i]))
        for i in range(in_flight)
    ]
    await asyncio.sleep(1.5 if in_flight else 0)
    decoder = next(e for e in cluster.directory.entries() if e.roles == {Role.DECODE})
    start = time.perf_counter()
    await cluster.plane.call(cluster.actuator.switch(decoder.name, parse_roles("p")))
    end = time.perf_counter()
    await asyncio.gather(*tasks)
    await cluster.plane.call(cluster.actuator.switch(decoder.name, parse_roles("d")))
    gaps_before, gaps_around = [], []
    for times in token_times:
        for a, b in zip(times, times[1:], strict=False):
            if b < start - 1.0:
                gaps_before.append(b - a)
            elif start - 1.0 <= b <= end + 1.0:
                gaps_around.append(b - a)
    return end - start, p99(gaps_before), p99(gaps_around)


async def migration_cost(cluster: Cluster, spec) -> tuple[float, float]:
    params = SamplingParams(max_tokens=96, ignore_eos=True)
    undisturbed = await stream(cluster, Request("calm", spec, params), [])
    times: list[float] = []
    task = asyncio.create_task(stream(cluster, Request("moved", spec, params), times))
    while len(times) < 20:
        await asyncio.sleep(0.01)
    stats = await cluster.stats()
    busy = max(
        (e for e in cluster.directory.entries() if Role.DECODE in e.roles),
        key=lambda e: stats[e.name].requests_in_flight,
    )
    os.kill(stats[busy.name].pid, signal.SIGKILL)
    return undisturbed, await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    model = str(ensure_model(default_model_dir(args.preset), args.preset))
    inputs = InputProcessor.from_dir(model)
    spec, _ = inputs.spec_from_user_prompt("Tell me a long story about the sea.", [])
    cluster = Cluster.start(
        model,
        "e+p+d",
        decode=2,
        engine=dict(kv_cache_memory_gb=0.25),
        control=ControlConfig(drain_timeout_s=30),
    )

    async def run() -> None:
        await stream(cluster, Request("warm", spec, SamplingParams(max_tokens=8)), [])
        print(f"\nRole switch d → p under load (epd-{args.preset}, e+p+d with 2 D, 96-token streams)")
        header = f"{'in flight':>9} | {'switch s':>8} | {'P99 ITL before ms':>17} | {'P99 ITL ±1 s ms':>15}"
        print(header + " | ratio")
        for n in (0, 8, 32):
            took, before, around = await switch_under_load(cluster, spec, n, f"s{n}")
            ratio = around / before if before == before and before > 0 else float("nan")
            print(f"{n:>9} | {took:>8.2f} | {before * 1000:>17.1f} | {around * 1000:>15.1f} | {ratio:.2f}x")
        calm, moved = await migration_cost(cluster, spec)
        print("\nDecode worker killed after 20 of 96 tokens (SIGKILL): the request migrates")
        print(f"undisturbed e2e {calm:.2f} s | migrated e2e {moved:.2f} s | extra {moved - calm:.2f} s")
        print("(switch = drain of the removed role + KV pool resize + NIXL re-registration + peers updated)")

    try:
        asyncio.run(run())
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
