"""Front-end cost with one and with two gateway replicas (printed, not asserted), tiny model, `epd`
topology, one run on this machine: requests/s at saturation with short text requests (2 output
tokens, many concurrent connections) and the gateway processes' CPU per request; then, on the
two-replica server, the time from a worker's death to its replacement serving, from the control
actor's death to its restart adopting the workers, and from a gateway replica's death to its
replacement serving (and, on the one-replica server, until the port serves again at all).

    python -m benchmarks.front_end [--concurrency 32] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx

from loadgen.server import listener_pids, start_server, stop_server
from serving.config import default_model_dir
from serving.engine.models.builder import ensure_model


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def saturate(url: str, concurrency: int, seconds: float) -> tuple[int, int]:
    """(requests answered 200, others) in `seconds` of `concurrency` clients, each on its own
    connection pool so that connections spread over the replicas."""
    body = {"model": "epd-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    done = [0, 0]
    stop = time.perf_counter() + seconds

    async def client() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            while time.perf_counter() < stop:
                response = await c.post(f"{url}/v1/chat/completions", json=body)
                done[response.status_code != 200] += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done[0], done[1]


def wait_for(check, timeout_s: float = 180) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        try:
            if check():
                return time.perf_counter() - start
        except (httpx.HTTPError, LookupError, KeyError):
            pass
        time.sleep(0.1)
    raise TimeoutError


def serves(url: str) -> bool:
    body = {"model": "epd-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 200


def admin(url: str) -> dict:
    return httpx.get(f"{url}/admin/workers", timeout=30).json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    model = ensure_model(default_model_dir("tiny"))
    work = Path(tempfile.mkdtemp(prefix="front-end-"))
    print(f"front end: tiny model, epd topology, {args.concurrency} clients, {args.seconds:.0f} s each, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("| gateway replicas | requests/s | gateway CPU ms / request | errors |")
    print("|---:|---:|---:|---:|")
    for replicas in (1, 2):
        flags = ["--model", str(model), "--topology", "epd", "--gateway-replicas", str(replicas)]
        proc, url = start_server(flags, work / f"serve-{replicas}.log", timeout_s=300)
        try:
            port = int(url.rsplit(":", 1)[1])
            wait_for(lambda port=port, n=replicas: len(listener_pids(port)) == n)
            asyncio.run(saturate(url, 4, 2.0))  # warm-up
            gateways = listener_pids(port)
            before = sum(cpu_seconds(p) for p in gateways)
            ok, failed = asyncio.run(saturate(url, args.concurrency, args.seconds))
            used = sum(cpu_seconds(p) for p in gateways) - before
            print(f"| {replicas} | {ok / args.seconds:.1f} | {1000 * used / max(ok, 1):.2f} | {failed} |")
            if replicas == 1:
                (only,) = gateways
                os.kill(only, signal.SIGKILL)
                lone_s = wait_for(lambda url=url: serves(url))
            else:
                recovery(url, port, lone_s)
        finally:
            stop_server(proc)


def recovery(url: str, port: int, lone_s: float) -> None:
    """Times to serve again after a worker, the control actor, and a gateway replica die."""
    view = admin(url)
    (worker,) = view["workers"]
    os.kill(worker["pid"], signal.SIGKILL)

    def replaced() -> bool:
        (now,) = admin(url)["workers"]
        return now["name"] != worker["name"] and now["phase"] == "active" and serves(url)

    worker_s = wait_for(replaced)
    control = admin(url)["control"]["pid"]
    os.kill(control, signal.SIGKILL)
    control_s = wait_for(lambda: admin(url)["control"]["pid"] not in (0, control))
    killed = listener_pids(port)[0]
    os.kill(killed, signal.SIGKILL)
    gateway_s = wait_for(lambda: len(listener_pids(port)) == 2 and killed not in listener_pids(port))
    print()
    print("| event (two gateway replicas) | seconds until |")
    print("|---|---:|")
    for event, seconds, until in (
        ("the only gateway replica SIGKILLed (one replica)", lone_s, "a new replica serving the port"),
        ("the only worker SIGKILLed", worker_s, "its replacement active and answering"),
        ("the control actor SIGKILLed", control_s, "restarted, workers adopted; serving never stopped"),
        ("a gateway replica SIGKILLed", gateway_s, "its replacement listening; the other served on"),
    ):
        print(f"| {event} | {seconds:.1f} ({until}) |")


if __name__ == "__main__":
    main()
