"""Batches drawn in a worker process, a few steps ahead of the optimiser.

Drawing, preprocessing and the probe's targets cost about as much CPU as a training step's model
work; in one process they ran in turn. A batch is a pure function of its step, so a worker computes
it ahead with the same result, and a resumed run still sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor

import torch

from serving.training.recipe import Recipe

_MAKER: Callable[[int], dict[str, torch.Tensor]] | None = None  # one per worker process


def _init(model_dir: str, recipe: Recipe, trainer: int) -> None:
    global _MAKER
    from serving.engine.inputs import InputProcessor
    from serving.training.batches import step_batch

    threading.Thread(target=_end_with, args=(trainer,), daemon=True).start()
    torch.set_num_threads(1)
    inputs = InputProcessor.from_dir(model_dir)
    _MAKER = lambda step: step_batch(inputs, recipe, step)  # noqa: E731


def _end_with(trainer: int) -> None:
    """The worker ends when its trainer does, however that ended: a trainer killed (SIGTERM, SIGKILL,
    the OOM killer) shuts nothing down, and the worker would wait for work forever."""
    while os.getppid() == trainer:
        time.sleep(0.5)
    os._exit(0)


def _make(step: int) -> dict[str, torch.Tensor]:
    assert _MAKER is not None
    return _MAKER(step)


class Prefetcher:
    def __init__(self, model_dir: str, recipe: Recipe, ahead: int = 2) -> None:
        self.ahead = ahead
        ctx = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP pool is running
        self.pool = ProcessPoolExecutor(
            1, mp_context=ctx, initializer=_init, initargs=(model_dir, recipe, os.getpid())
        )
        self.pending: dict[int, Future] = {}

    def get(self, step: int) -> dict[str, torch.Tensor]:
        for s in range(step, step + self.ahead + 1):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(_make, s)
        for s in [s for s in self.pending if s < step]:
            self.pending.pop(s).cancel()
        return self.pending.pop(step).result()

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)
