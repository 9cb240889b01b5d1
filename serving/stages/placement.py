"""CPU pinning of a worker process and the buffer sizes (KV blocks, embedding slots) its roles need."""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from serving.config import WorkerConfig
from serving.types import Role, Roles


def pin_threads(cpus: tuple[int, ...], keep: int | None = None) -> None:
    """Pin every thread of this process but `keep` (a native thread id) to `cpus`; a thread started
    later inherits its creator's CPUs."""
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != keep:
            with contextlib.suppress(OSError):  # the thread may have exited meanwhile
                os.sched_setaffinity(int(tid), cpus)


def pin_process(cpus: tuple[int, ...]) -> None:
    """Pin every thread of this process (and so the threads it starts later) to `cpus`, and size
    torch's thread pool to match, so benchmarks can give each stage its own cores."""
    pin_threads(cpus)
    torch.set_num_threads(len(cpus))


def keep_cpus_for_engine(cpus: tuple[int, ...], runtime_cpus: tuple[int, ...]) -> None:
    """Run on the engine thread once it starts: it keeps `cpus` (and so do the OpenMP threads it starts
    for torch), and every other thread of the process -- Ray's RPC and IO threads, the streams that
    serialize each step's deltas, the transport -- moves to `runtime_cpus`. The runtime's few percent
    of CPU then no longer preempts the engine on its own cores, and its latency (a Ray message waits
    for the core while the engine computes) no longer sits in every step."""
    me = threading.get_native_id()
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, cpus)
    pin_threads(runtime_cpus, keep=me)
    # omp_set_num_threads is per calling thread: set it where the engine's parallel regions start.
    torch.set_num_threads(len(cpus))


def buffer_sizes(roles: Roles, cfg: WorkerConfig, full_kv_blocks: int, min_kv_blocks: int) -> tuple[int, int]:
    """(KV blocks, embedding slots) a worker with these roles needs. D keeps whole requests: the full
    pool. P holds prompts only until D pulls them: a share of it, never less than one longest
    request. E needs no KV; only E and P move embeddings."""
    if Role.DECODE in roles:
        kv = full_kv_blocks
    elif Role.PREFILL in roles:
        kv = min(full_kv_blocks, max(min_kv_blocks, int(full_kv_blocks * cfg.prefill_kv_fraction)))
    else:
        kv = 1
    slots = cfg.embedding_slots if roles & {Role.ENCODE, Role.PREFILL} else 1
    return kv, slots
