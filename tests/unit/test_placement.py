"""CPU placement of a pinned worker: its engine thread keeps the worker's cores, everything else in the
process (Ray's threads, the streams, the transport) and the rest of a local server moves to the cores
no worker is pinned to."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from serving.cli import build_parser, serve_settings
from serving.cluster import spare_cpus

CPUS = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")

# Run in a child process: affinity is process state, and pytest's own must stay as it is.
_SCRIPT = """
import json, os, threading
from serving.stages.placement import keep_cpus_for_engine, pin_process
engine_cpus, runtime_cpus = tuple(json.loads(os.environ["ENGINE"])), tuple(json.loads(os.environ["RUNTIME"]))
pin_process(engine_cpus)
release = threading.Event()
bystander = threading.Thread(target=release.wait)  # a runtime thread that exists before the engine's
bystander.start()
seen = {}
def engine():
    keep_cpus_for_engine(engine_cpus, runtime_cpus)
    seen["engine"] = sorted(os.sched_getaffinity(0))
    child = threading.Thread(target=lambda: seen.setdefault("engine_child", sorted(os.sched_getaffinity(0))))
    child.start(); child.join()
thread = threading.Thread(target=engine)
thread.start(); thread.join()
seen["bystander"] = sorted(os.sched_getaffinity(bystander.native_id))
seen["main"] = sorted(os.sched_getaffinity(0))
late = threading.Thread(target=lambda: seen.setdefault("main_child", sorted(os.sched_getaffinity(0))))
late.start(); late.join()
release.set()
print(json.dumps(seen))
"""


@two_cpus
def test_the_engine_thread_keeps_its_cores_and_the_runtime_moves_off_them() -> None:
    env = {**os.environ, "ENGINE": json.dumps(CPUS[:1]), "RUNTIME": json.dumps(CPUS[1:])}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["engine"] == seen["engine_child"] == CPUS[:1]  # its OpenMP threads start from it
    assert seen["bystander"] == seen["main"] == seen["main_child"] == CPUS[1:]


def test_spare_cpus_are_the_ones_no_worker_is_pinned_to() -> None:
    assert spare_cpus({"e": [CPUS[0]], "pd": [CPUS[0]]}) == tuple(CPUS[1:])
    assert spare_cpus({"epd": CPUS}) == ()


@two_cpus
def test_serve_pins_workers_runtime_to_the_spare_cores(tiny_model) -> None:
    def template(*flags: str):
        args = build_parser().parse_args(["serve", "--model", str(tiny_model), *flags])
        return serve_settings(args, "serve", 0, local=True)[0].worker_template

    assert template("--pin-cpus", f"epd={CPUS[0]}").runtime_cpus == tuple(CPUS[1:])
    assert template().runtime_cpus == ()  # unpinned: nothing moves
    assert template("--pin-cpus", "epd=" + ",".join(map(str, CPUS))).runtime_cpus == ()


def test_a_placement_hook_that_raises_marks_the_engine_loop_broken() -> None:
    """The engine thread's start hook (CPU placement) failing must not leave a worker that looks alive
    and never steps: the loop is broken, the worker is told, and every call fails fast."""
    import threading

    from serving.stages.loop import EngineLoop
    from serving.types import WorkerUnavailable

    class IdleEngine:  # a unit test of the loop alone: nothing to step
        def has_unfinished(self) -> bool:
            return False

    told = threading.Event()

    def fail() -> None:
        raise OSError("sched_setaffinity refused")

    loop = EngineLoop(IdleEngine(), lambda: None, lambda *_: None, lambda _: told.set(), on_start=fail)
    try:
        assert told.wait(5)
        assert loop.broken is not None and not loop.alive
        with pytest.raises(WorkerUnavailable):
            loop.call(lambda: 1)
    finally:
        loop.stop()


@pytest.mark.parametrize(
    ("topology", "counts", "message"),
    [
        ("e+p+d", (1, 1, 0), "needs at least one 'd' worker (--decode is 0)"),
        ("e+p+d", (1, 0, 1), "needs at least one 'p' worker (--prefill is 0)"),
        ("e+p+d", (0, 1, 1), "needs at least one 'e' worker (--encode is 0)"),
        ("ep+d", (1, 1, 0), "needs at least one 'd' worker (--decode is 0)"),
        ("epd", (1, 0, 1), "needs at least one 'epd' worker (--prefill is 0)"),
    ],
)
def test_an_empty_pool_is_refused(topology, counts, message):
    from serving.cluster import pool_sizes

    with pytest.raises(ValueError, match=re.escape(message)):
        pool_sizes(topology, *counts)
    assert pool_sizes("e+pd", 2, 1, 0) == {"e": 2, "pd": 1}, "d's count is unused without a d pool"
