"""Where a streaming server's CPU goes, per engine step and per token
(`python -m benchmarks.delivery_profile`).

Starts `epd serve --topology epd`, runs a closed-loop text load (concurrency 16, fixed output length)
through HTTP, and splits the CPU every server process used during the load into parts:

- the worker, from its own counters (`StageWorker.delivery_counters`: CPU time of the engine thread
  in the step and in building the per-step outbox messages, and of each subscription's thread while
  Ray serializes and sends a message) and from /proc per thread: torch's compute threads count with
  the engine step, Ray's native threads (gRPC, IO) and its task loop (the main thread) as its runtime;
- the gateway replica, from /proc, split by py-spy samples of the code its threads were in (the
  subscription's demux, the per-request streams, SSE rendering); what py-spy sees no Python frame
  of (Ray's task loop, uvloop, Cython) is Ray's and Serve's runtime there;
- the HTTP server: uvicorn and Starlette in the gateway replica (`epd serve` starts no Serve proxy),
  or all of Serve's HTTP proxy process where one runs (a Serve config); the other processes (raylet,
  GCS, Serve controller, the driver) as one line.

CPU is shared with whatever else runs on the machine: compare runs made one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.idle_cpu import server_processes
from loadgen.client import Target, run
from loadgen.server import start_server, stop_server
from loadgen.workloads import PRESETS, synthetic

_TICKS = os.sysconf("SC_CLK_TCK")
# Threads Ray's C++ core starts in every worker process (their names in /proc): its transport.
_RAY_NATIVE = (
    "worker.io",
    "client.poll",
    "server.poll",
    "nexting_thread",
    "timer_manager",
    "grpc_",
    "default-executo",
)

# Py-spy stacks of the gateway replica's Python threads → parts, first match wins (a stack is its
# frames from the root, `;`-joined). Most of the replica's CPU runs where py-spy sees no Python
# frame (Ray's task loop, uvloop, Cython): that is Serve's and Ray's runtime.
_GATEWAY_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("sse_render", ("gateway/render.py", "gateway/service.py")),
    ("demux", ("_Subscription._run",)),
    ("request_streams", ("stages/handles.py", "serving/pipeline.py", "serving/api/")),
    ("tokenize", ("tokenizer.py", "inputs.py")),
    # Last: stacks in the HTTP server with none of our frames (reading requests, writing SSE).
    ("http_write", ("uvicorn/", "starlette/", "httptools", "h11/")),
]

PARTS = [
    ("engine_step", "engine step: engine thread + torch compute threads, worker"),
    ("outbox", "per-step outbox messages: build + flush, worker"),
    ("ray_send", "Ray transport, worker: serialize + send on the stream's thread"),
    ("worker_ray", "Ray runtime threads of the worker (gRPC, IO, task loop)"),
    ("worker_other", "worker, other Python threads (control calls, health, NIXL)"),
    ("demux", "stream demux: subscription → per-request queues, gateway"),
    ("request_streams", "per-request streams: handle, pipeline, generation, gateway"),
    ("sse_render", "SSE chunks: render + route handler, gateway"),
    ("tokenize", "tokenize prompts, gateway"),
    ("gateway_ray", "Ray + Serve runtime and the event loop's native code, gateway replica"),
    ("http_write", "HTTP server: uvicorn in the replica, or Serve's HTTP proxy process where one runs"),
    ("ray_processes", "other processes (raylet, GCS, Serve controller, driver)"),
]


def _threads(pid: int) -> dict[int, tuple[int, str]]:
    """tid → (CPU ticks, name) of a process's threads."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        out[int(tid)] = (int(fields[11]) + int(fields[12]), raw[raw.index("(") + 1 : raw.rindex(")")])
    return out


def _used(
    before: dict[int, tuple[int, str]], after: dict[int, tuple[int, str]]
) -> dict[int, tuple[float, str]]:
    """tid → (CPU seconds, name) between two snapshots."""
    return {tid: ((t - before.get(tid, (0, n))[0]) / _TICKS, n) for tid, (t, n) in after.items()}


def _samples(path: Path, rules: list[tuple[str, tuple[str, ...]]]) -> dict[str, int]:
    """Py-spy's raw stacks counted by part (`other` for none)."""
    counts: dict[str, int] = defaultdict(int)
    if not path.exists():
        return counts
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        part = next((name for name, keys in rules if any(k in stack for k in keys)), "other")
        counts[part] += int(n)
    return counts


def _gcs_address(pids: dict[int, tuple[int, str]]) -> str:
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for a in args:
            if a.startswith(b"--gcs-address="):
                return a.split(b"=", 1)[1].decode()
    raise RuntimeError("no Ray process of the server names its GCS address")


class Counters:
    """The worker's own counters, over a Ray connection to the server's cluster."""

    def __init__(self, gcs: str) -> None:
        # The server's Ray uses token auth (Ray 2.60's default for a cluster it starts); a driver that
        # joins it must say so, before Ray is imported, to send the token (~/.ray/auth_token).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        import ray

        ray.init(address=gcs, namespace="epd", log_to_driver=False, logging_level="ERROR")
        names = ray.util.list_named_actors()  # the namespace holds only the workers
        self.actors = [ray.get_actor(n) for n in names]

    def close(self) -> None:
        import ray

        ray.shutdown()

    def read(self) -> dict[str, Any]:
        import ray

        from serving.stages.handles import CONTROL_GROUP

        total: dict[str, Any] = defaultdict(float)
        refs = [a.delivery_counters.options(concurrency_group=CONTROL_GROUP).remote() for a in self.actors]
        for counts in ray.get(refs):
            for k, v in counts.items():
                if k in ("engine_thread", "python_threads"):  # thread ids: the first worker's
                    total.setdefault(f"first_{k}", v)
                else:
                    total[k] += v
        return total


def _py_spy(pid: int, out: Path, rate: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("py-spy")
    cmd = [str(exe), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--nonblocking"]
    return subprocess.Popen(
        [*cmd, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def profile(
    model: str, serve_args: list[str], requests: int, concurrency: int, output_tokens: int, rate: int
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="epd-delivery-"))
    proc, url = start_server(["--model", model, *serve_args], tmp / "serve.log")
    try:
        with urllib.request.urlopen(f"{url}/v1/models") as r:
            model_id = json.load(r)["data"][0]["id"]
        target = Target(f"{url}/v1", model_id)
        load = [
            dataclasses.replace(r, output_tokens=output_tokens)
            for r in synthetic(PRESETS["text"], requests + concurrency, seed=13)
        ]
        asyncio.run(run(target, load[:concurrency], None, concurrency, progress=False))  # warm up
        pids = server_processes(proc.pid)
        role = {name: pid for pid, (_, name) in pids.items()}
        worker, replica, proxy = (
            next((pid for name, pid in role.items() if name.startswith(prefix)), None)
            for prefix in ("ray::StageWorke", "ray::ServeRepli", "ray::ProxyActor")
        )
        if worker is None or replica is None:
            raise RuntimeError(f"no worker or gateway replica among the server's processes: {sorted(role)}")
        watched = [pid for pid in (worker, replica, proxy) if pid is not None]
        counters = Counters(_gcs_address(pids))
        c0, p0 = counters.read(), server_processes(proc.pid)
        t0 = {pid: _threads(pid) for pid in watched}
        spies = {replica: _py_spy(replica, tmp / f"spy-{replica}.txt", rate)}
        start = time.perf_counter()
        records = asyncio.run(run(target, load[concurrency:], None, concurrency, progress=False))
        wall = time.perf_counter() - start
        t1 = {pid: _threads(pid) for pid in watched}
        c1, p1 = counters.read(), server_processes(proc.pid)
        counters.close()  # before the server stops: a driver whose GCS dies is terminated
        for spy in spies.values():
            spy.send_signal(signal.SIGINT)
        for spy in spies.values():
            spy.wait(timeout=60)
    finally:
        stop_server(proc)
    c = {k: c1[k] - c0.get(k, 0.0) for k in c1 if not k.startswith("first_")}
    cpu = {pid: (ticks - p0.get(pid, (0, ""))[0]) / _TICKS for pid, (ticks, _) in p1.items()}
    errors = sum(r.error is not None for r in records)
    tokens = sum(r.output_tokens for r in records)
    parts: dict[str, float] = defaultdict(float)

    # Worker: the engine thread's counters; threads that are not Python's nor Ray's are torch's.
    engine_tid, python = int(c1["first_engine_thread"]), set(c1["first_python_threads"])
    engine_thread = compute = ray_threads = python_other = 0.0
    for tid, (used, name) in _used(t0[worker], t1[worker]).items():
        if tid == engine_tid:
            engine_thread += used
        elif tid in python:
            python_other += used
        elif name.startswith(_RAY_NATIVE):
            ray_threads += used
        else:
            compute += used
    # The main thread is Python's but runs Ray's task loop (and its signal checks).
    parts["engine_step"] += engine_thread - c["deliver_cpu_s"] + compute
    parts["outbox"] += c["deliver_cpu_s"]
    parts["ray_send"] += c["send_cpu_s"]
    main = (t1[worker].get(worker, (0, ""))[0] - t0[worker].get(worker, (0, ""))[0]) / _TICKS
    parts["worker_ray"] += ray_threads + main
    parts["worker_other"] += max(0.0, python_other - main - c["send_cpu_s"])

    # Gateway replica: our code's Python frames by sampling; the rest is Ray's and Serve's runtime.
    g_used = sum(used for used, _ in _used(t0[replica], t1[replica]).values())
    spy = _samples(tmp / f"spy-{replica}.txt", _GATEWAY_RULES)
    sampled = sum(spy.values())
    ours = 0.0
    for part, n in spy.items():
        if part != "other" and sampled:
            # Samples are of wall time on a thread that was running: scale by the thread CPU seen.
            parts[part] += g_used * n / sampled
            ours += g_used * n / sampled
    parts["gateway_ray"] += g_used - ours

    # Serve's HTTP proxy, where one runs: all of it is the HTTP path; the rest of the server as one line.
    if proxy is not None:
        parts["http_write"] += sum(used for used, _ in _used(t0[proxy], t1[proxy]).values())
    parts["ray_processes"] += sum(s for pid, s in cpu.items() if pid not in watched)

    steps = c["steps"] or 1
    total = sum(parts.values())
    print(
        f"`epd serve {' '.join(serve_args)}`: {len(records)} requests at concurrency {concurrency}, "
        f"{output_tokens} output tokens each ({errors} errors), {wall:.1f} s, {tokens / wall:.1f} tok/s"
    )
    print(
        f"engine steps {int(c['steps'])}, tokens {int(c['tokens'])} ({c['tokens'] / steps:.1f} per step), "
        f"Ray messages {int(c['messages'])} carrying {int(c['items'])} deltas"
    )
    print(f"server CPU {total:.2f} s over {wall:.1f} s ({100 * total / wall:.0f} % of a core)\n")
    print("| part | ms per step | ms per token | share |")
    print("|---|---:|---:|---:|")
    per_token = max(c["tokens"], 1)
    for key, label in PARTS:
        s = parts.get(key, 0.0)
        print(f"| {label} | {1e3 * s / steps:.2f} | {1e3 * s / per_token:.3f} | {100 * s / total:.1f} % |")
    print(f"| **total** | {1e3 * total / steps:.2f} | {1e3 * total / per_token:.3f} | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve-args", default="--topology epd", help="flags of `epd serve` besides --model")
    p.add_argument("--model", help="model directory (default: the small preset)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    args = p.parse_args()
    if args.model is None:
        from serving.config import default_model_dir
        from serving.engine.models.builder import ensure_model

        args.model = str(ensure_model(default_model_dir("small"), "small"))
    profile(
        args.model, args.serve_args.split(), args.requests, args.concurrency, args.output_tokens, args.rate
    )


if __name__ == "__main__":
    main()
