"""CPU pinning of a worker process and the buffer sizes (KV blocks, embedding slots) its roles need."""

from __future__ import annotations

import contextlib
import os

import torch

from serving.config import WorkerConfig
from serving.types import Role, Roles


def pin_process(cpus: tuple[int, ...]) -> None:
    """Pin every thread of this process (and so the threads it starts later) to `cpus`, and size
    torch's thread pool to match, so benchmarks can give each stage its own cores."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)
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
