"""The engine thread of a worker: the only thread that touches the engine, its pools and leases.

Other threads hand it work with `call` (run a function there, wait for its result) or `encode`
(media joining the next vision batch, with what to do with the embeddings). Each pass it runs the
queued calls, housekeeping (pull notifications, lease expiry), one vision batch of the queued encodes
in arrival order (up to `max_encode_patches`; the rest wait for the next pass), and one engine step,
then hands the step's token deltas to `deliver`. What an encode asks to run after its batch (admitting
the request into the engine, holding its embeddings for a peer) runs in the same pass, before the step:
a colocated request's prefill starts in the step right after its vision batch, not one or two steps
later; and a burst of image requests no longer holds the running decodes back for all its vision
batches at once. With nothing to run it sleeps until work is handed to it: only while
`housekeeping_due` says something is pending (leases a peer may pull) does it wake every few
milliseconds, so an idle worker costs no CPU.

A failure inside one request is contained by the engine (that request ends with an error). A failure
nothing explains, or a pass that runs longer than `stuck_after_s` (the watchdog), marks the loop
broken: `on_broken` is told once, every later `call` raises `WorkerUnavailable`, and the worker reports
itself unhealthy so the control plane replaces it, instead of hanging every request sent to it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TypeVar

import torch

from serving.engine.image_processor import ProcessedImage
from serving.engine.llm import LLMEngine
from serving.types import TokenDelta, WorkerUnavailable

T = TypeVar("T")
_HOUSEKEEPING_WAIT_S = 0.005  # while leases are out: how soon a pull's notification frees memory
_IDLE_WAIT_S = 1.0  # nothing pending: wake once a second anyway (cheap), never spin
_LIVENESS_CHECK_S = 0.5
log = logging.getLogger(__name__)

Deliver = Callable[[list[TokenDelta]], None]  # one step's deltas


def _drain(q: queue.Queue) -> list:
    """Everything queued on `q` now."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


class VisionBatchFailed(Exception):
    """An encode's own vision batch failed (its cause says why); raised by `EngineLoop.encode`, so a
    caller tells it from a failure of what it asked to run after the batch."""


@dataclass(frozen=True)
class Encoded:
    """One encode's share of a vision batch, handed to what it asked to run next."""

    embeds: list[torch.Tensor]  # one per item, in the order given
    queued_s: float  # from the hand-over to the start of its vision batch
    run_s: float  # the vision batch's time (shared with the jobs batched with it)


@dataclass
class _EncodeJob:
    request_id: str
    images: list[ProcessedImage]
    then: Callable[[Encoded], object]
    future: Future
    queued_at: float

    @property
    def patches(self) -> int:
        return sum(im.pixel_values.shape[0] for im in self.images)


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        housekeeping: Callable[[], None],
        deliver: Deliver,
        on_broken: Callable[[str], None],
        stuck_after_s: float = 120.0,
        housekeeping_due: Callable[[], bool] = lambda: False,
        on_start: Callable[[], None] | None = None,
        wanted: Callable[[str], bool] = lambda _request_id: True,
    ) -> None:
        self.engine = engine
        # Whether a request still wants its encode: one cancelled while its media waited for a vision
        # batch is dropped when the batch is formed (cancels run on this thread too, so no later).
        self._wanted = wanted
        self._on_start = on_start  # run first on the engine thread (CPU placement)
        self._housekeeping = housekeeping
        self._housekeeping_due = housekeeping_due
        self._wake = threading.Event()  # set whenever a call or an encode is queued
        self._deliver = deliver
        self._on_broken = on_broken
        self.stuck_after_s = stuck_after_s
        self._calls: queue.Queue[tuple[Callable[[], object], Future]] = queue.Queue()
        self._encodes: queue.Queue[_EncodeJob] = queue.Queue()
        self._encode_backlog: list[_EncodeJob] = []  # taken off the queue, waiting for a later pass
        self.images_encoded = 0
        # CPU seconds of this thread (`time.thread_time`) per part, for `benchmarks.delivery_profile`:
        # a few clock reads per step, cheap enough to keep on.
        self.steps = 0
        self.tokens = 0
        self.step_cpu_s = 0.0
        self.deliver_cpu_s = 0.0
        self.broken: str | None = None  # why the loop stopped serving, once it has
        self._pass_started: float | None = None  # when the current pass began; None while idle-waiting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
        self._thread.start()
        self._watchdog.start()

    @property
    def thread_id(self) -> int | None:
        """The engine thread's id in the OS (its CPU time in /proc)."""
        return self._thread.native_id

    @property
    def alive(self) -> bool:
        return self.broken is None and self._thread.is_alive()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread and return its result; fails fast once the loop is broken."""
        future: Future = Future()
        self._check_alive()
        self._calls.put((fn, future))
        self._wake.set()
        while True:
            try:
                return future.result(timeout=_LIVENESS_CHECK_S)
            except FutureTimeout:
                self._check_alive()

    def encode(self, request_id: str, images: list[ProcessedImage], then: Callable[[Encoded], T]) -> T:
        """Run the images through a vision batch (shared with other requests' images), then `then` on
        the embeddings, on the engine thread in the same pass; returns what `then` returns."""
        future: Future = Future()
        self._check_alive()
        self._encodes.put(_EncodeJob(request_id, images, then, future, time.perf_counter()))
        self._wake.set()
        while True:
            try:
                return future.result(timeout=_LIVENESS_CHECK_S)
            except FutureTimeout:
                self._check_alive()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def mark_broken(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.error("engine loop broken: %s", reason)
            self._on_broken(reason)

    def _check_alive(self) -> None:
        if not self.alive:
            raise WorkerUnavailable(f"the worker's engine is not running ({self.broken or 'stopped'})")

    def _run(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
            while not self._stop.is_set() and self.broken is None:
                busy = self.engine.has_unfinished() or bool(self._encode_backlog)
                self._run_calls(block=not busy)
                self._pass_started = time.monotonic()
                self._housekeeping()
                self._run_encodes()
                if self.engine.has_unfinished():
                    self._step()
                self._pass_started = None
        except BaseException as exc:  # noqa: BLE001 - nothing request-specific explains it
            log.exception("engine loop failed")
            self.mark_broken(f"engine loop failed: {type(exc).__name__}")
        finally:
            self._fail_queued()

    def _watch(self) -> None:
        while not self._stop.wait(1.0) and self.broken is None:
            started = self._pass_started
            if started is not None and time.monotonic() - started > self.stuck_after_s:
                self.mark_broken(f"an engine pass has run for over {self.stuck_after_s:.0f} s")

    def _run_calls(self, block: bool) -> None:
        if block and self._calls.empty() and self._encodes.empty():
            self._wake.wait(_HOUSEKEEPING_WAIT_S if self._housekeeping_due() else _IDLE_WAIT_S)
        # Cleared before draining: work queued after this point sets it again, so none is missed.
        self._wake.clear()
        try:
            item = self._calls.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                future.set_exception(exc)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def _run_encodes(self) -> None:
        while not self._encodes.empty():
            self._encode_backlog.append(self._encodes.get_nowait())
        for job in [j for j in self._encode_backlog if not self._wanted(j.request_id)]:
            self._encode_backlog.remove(job)
            job.future.set_exception(WorkerUnavailable("the request was cancelled before its vision batch"))
        if not self._encode_backlog:
            return
        # Whole jobs in arrival order up to the patch budget, at least one: one request's images stay
        # in one batch, and a burst of image requests is spread over passes with steps between them.
        budget, jobs = self.engine.cfg.max_encode_patches, []
        while self._encode_backlog and (not jobs or self._encode_backlog[0].patches <= budget):
            job = self._encode_backlog.pop(0)
            budget -= job.patches
            jobs.append(job)
        self._encode_jobs(jobs)

    def _encode_jobs(self, jobs: list[_EncodeJob]) -> None:
        """One vision batch for these jobs; if it fails, each job alone, so only the job that fails by
        itself gets the error. Then each job's `then`, whose failure is that job's alone."""
        started = time.perf_counter()
        try:
            if self.engine.fault_hook is not None:
                self.engine.fault_hook("encode", [job.request_id for job in jobs])
            flat = [im for job in jobs for im in job.images]
            embeds: list[torch.Tensor] = []
            limit = self.engine.cfg.max_encode_images
            for start in range(0, len(flat), limit):
                embeds.extend(self.engine.runner.encode(flat[start : start + limit]))
        except Exception as exc:  # noqa: BLE001 - narrowed down to the failing job
            if len(jobs) == 1:
                failed = VisionBatchFailed(f"the vision batch failed: {type(exc).__name__}")
                failed.__cause__ = exc
                jobs[0].future.set_exception(failed)
                return
            for job in jobs:
                self._encode_jobs([job])
            return
        run_s = time.perf_counter() - started
        self.images_encoded += len(flat)
        for job in jobs:
            mine, embeds = embeds[: len(job.images)], embeds[len(job.images) :]
            try:
                job.future.set_result(job.then(Encoded(mine, started - job.queued_at, run_s)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                job.future.set_exception(exc)

    def _step(self) -> None:
        cpu = time.thread_time()
        deltas = self.engine.step()
        stepped = time.thread_time()
        self._deliver(deltas)
        self.steps += 1
        self.tokens += sum(len(d.token_ids) for d in deltas)
        self.step_cpu_s += stepped - cpu
        self.deliver_cpu_s += time.thread_time() - stepped

    def _fail_queued(self) -> None:
        """Whoever still waits on the loop learns that it stopped."""
        error = WorkerUnavailable("the worker's engine stopped")
        futures = [job.future for job in self._encode_backlog]
        futures += [fn_future[1] for fn_future in _drain(self._calls)]
        futures += [job.future for job in _drain(self._encodes)]
        for future in futures:
            if not future.done():
                future.set_exception(error)
