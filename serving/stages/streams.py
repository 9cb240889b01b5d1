"""A worker's batched streams: every request one consumer streams from it, delivered per engine step.

`start_generate` / `start_decode` admit a request as `generate` / `decode` do, but instead of a stream
per request its deltas go to the consumer's outbox; `subscribe` hands the consumer one list per step
(see `outbox`). Mixed into `StageWorker`, whose ledger, engine loop and admission paths it uses.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serving.stages.outbox import DeltaTimings, Outbox, StreamItem, StreamSink
from serving.stages.paths import _EVICTED
from serving.types import EmbeddingRef, KVRef, PromptSpec, Role, SamplingParams, StageTimings, WorkerPhase

if TYPE_CHECKING:
    import numpy as np

_TAKE_WAIT_S = 1.0  # a subscription with nothing to send re-checks the worker's phase this often


@dataclass
class StreamCounters:
    """What the subscriptions sent: messages, deltas in them, and the CPU seconds Ray took to
    serialize and send them (read by `benchmarks.delivery_profile`)."""

    messages: int = 0
    items: int = 0
    send_cpu_s: float = 0.0

    def add(self, items: int, cpu_s: float) -> None:
        self.messages += 1
        self.items += items
        self.send_cpu_s += cpu_s


class ConsumerStreams:
    stream_counters: StreamCounters

    def subscribe(self: Any, consumer: str) -> Iterator[list[StreamItem]]:
        """Every engine step's deltas for the consumer's requests, one list per step, until the worker
        stops."""
        outbox = self._outbox(consumer)
        while self.phase is not WorkerPhase.STOPPED:
            if items := outbox.take(_TAKE_WAIT_S):
                # Between the yield and the next take, Ray serializes the list and sends it on this
                # thread: its CPU time is the worker's side of the transport.
                cpu = time.thread_time()
                yield items
                self.stream_counters.add(len(items), time.thread_time() - cpu)

    def delivery_counters(self: Any) -> dict[str, Any]:
        """Cumulative counts and CPU seconds of the engine thread and the subscriptions, and which
        threads are the engine's and Python's (a control call: `benchmarks.delivery_profile` reads it
        before and after a load, and the threads' CPU from /proc)."""
        loop, sent = self.loop, self.stream_counters
        return {
            "engine_thread": loop.thread_id,
            "python_threads": [t.native_id for t in threading.enumerate()],
            "steps": loop.steps,
            "tokens": loop.tokens,
            "step_cpu_s": loop.step_cpu_s,
            "deliver_cpu_s": loop.deliver_cpu_s,
            "messages": sent.messages,
            "items": sent.items,
            "send_cpu_s": sent.send_cpu_s,
        }

    def start_generate(
        self: Any,
        consumer: str,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        embeddings: EmbeddingRef | None = None,
        images: list[np.ndarray] | None = None,
        resume: list[int] | None = None,
    ) -> None:
        """`generate`, its deltas going to the consumer's subscription."""
        self.ledger.admit(request_id, Role.PREFILL)
        try:
            self.ledger.admit(request_id, Role.DECODE)
            timings = StageTimings()
            sink = self._stream_sink(consumer, request_id, timings)
            self._admit(request_id, spec, embeddings, images, timings, params, False, resume, sink)
        except BaseException:
            self._quiet_free(request_id)
            raise

    def start_decode(
        self: Any,
        consumer: str,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        kv: KVRef,
        restored: list[int] | None = None,
    ) -> None:
        """`decode`, its deltas going to the consumer's subscription."""
        self.ledger.admit(request_id, Role.DECODE)

        def make_sink(transfer_s: float) -> StreamSink:
            timings = StageTimings(p2d_transfer_s=transfer_s, p2d_bytes=float(kv.source.nbytes))
            return self._stream_sink(consumer, request_id, timings)

        try:
            self._join_decode(request_id, spec, params, kv, restored, make_sink)
        except BaseException:
            self._quiet_free(request_id)
            raise

    def _outbox(self: Any, consumer: str) -> Outbox:
        return self._outboxes.setdefault(consumer, Outbox())  # atomic under the GIL

    def _stream_sink(self: Any, consumer: str, request_id: str, timings: StageTimings) -> StreamSink:
        stamp = DeltaTimings(request_id, timings, self._prefilled)
        return StreamSink(self._outbox(consumer), stamp, _EVICTED)
