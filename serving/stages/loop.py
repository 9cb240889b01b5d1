"""The engine thread of a worker: the only thread that touches the engine, its pools and leases.

Other threads hand it work with `call` (run a function there, wait for its result) or `encode`
(images joining the next vision batch). Each pass it runs the queued calls, housekeeping (pull
notifications, lease expiry), one batched encode of everything queued, and one engine step, then
routes each token delta to the queue of its request.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from serving.engine.image_processor import ProcessedImage
from serving.engine.llm import LLMEngine
from serving.types import TokenDelta

T = TypeVar("T")
_IDLE_WAIT_S = 0.005


class EngineLoop:
    def __init__(self, engine: LLMEngine, housekeeping: Callable[[], None]) -> None:
        self.engine = engine
        self._housekeeping = housekeeping
        self._calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._encodes: queue.Queue[tuple[list[ProcessedImage], Future]] = queue.Queue()
        self.sinks: dict[str, queue.Queue[TokenDelta]] = {}
        self.prefill_run_s: dict[str, float] = {}
        self.images_encoded = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T]) -> T:
        future: Future = Future()
        self._calls.put((fn, future))
        return future.result()

    def encode(self, images: list[ProcessedImage]) -> list[torch.Tensor]:
        future: Future = Future()
        self._encodes.put((images, future))
        return future.result()

    def open_sink(self, request_id: str) -> queue.Queue[TokenDelta]:
        """Where a request's deltas will go; call on the loop thread, before the request can step."""
        sink: queue.Queue[TokenDelta] = queue.Queue()
        self.sinks[request_id] = sink
        return sink

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished()
            self._run_calls(block=not busy)
            self._housekeeping()
            self._run_encodes()
            if self.engine.has_unfinished():
                self._step()

    def _run_calls(self, block: bool) -> None:
        try:
            item = (
                self._calls.get(timeout=_IDLE_WAIT_S)
                if block and self._encodes.empty()
                else self._calls.get_nowait()
            )
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
        jobs: list[tuple[list[ProcessedImage], Future]] = []
        while not self._encodes.empty():
            jobs.append(self._encodes.get_nowait())
        if not jobs:
            return
        try:
            flat = [im for images, _ in jobs for im in images]
            embeds: list[torch.Tensor] = []
            limit = self.engine.cfg.max_encode_images
            for start in range(0, len(flat), limit):
                embeds.extend(self.engine.runner.encode(flat[start : start + limit]))
            self.images_encoded += len(flat)
            for images, future in jobs:
                future.set_result(embeds[: len(images)])
                embeds = embeds[len(images) :]
        except BaseException as exc:  # noqa: BLE001
            for _, future in jobs:
                if not future.done():
                    future.set_exception(exc)

    def _step(self) -> None:
        start = time.perf_counter()
        deltas = self.engine.step()
        elapsed = time.perf_counter() - start
        for delta in deltas:
            if self.engine.last_stage == "prefill":
                self.prefill_run_s[delta.request_id] = elapsed
            sink = self.sinks.get(delta.request_id)
            if sink is not None:
                sink.put(delta)
                if delta.finished:
                    self.sinks.pop(delta.request_id, None)
