"""Per-step delivery of token deltas: one message per engine step per consumer, not one per token.

A consumer (one process streaming requests from this worker, e.g. a gateway replica) opens one
subscription per worker. Each request it streams puts its deltas in the consumer's `Outbox` through a
`StreamSink`; the engine loop adds a whole step's deltas and then wakes the subscription once, so a
step that advances 32 requests of one consumer crosses the process boundary as one list.

  1. start: the request is admitted with a `StreamSink` as its ledger sink (no stream of its own).
  2. each step: `deliver` puts every delta into its sink (timings stamped on the first and the last),
     then `flush`es the outboxes it touched; the subscription takes everything queued as one list.
  3. end: a finished delta frees the request; an eviction or a stopped engine becomes a `StreamEnd`,
     which the consumer raises as WorkerUnavailable for that request alone (it continues elsewhere).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from serving.types import StageTimings, TokenDelta


@dataclass
class StreamEnd:
    """The worker gave a request up (evicted, engine stopped): it must continue on another worker."""

    request_id: str
    reason: str


StreamItem = TokenDelta | StreamEnd


class DeltaTimings:
    """Stamps a request's stage timings on its stream: what came before (encode, transfers) and the
    prefill on the first delta, the decode time on the last."""

    def __init__(
        self, request_id: str, timings: StageTimings | None, prefilled: dict[str, StageTimings]
    ) -> None:
        self.request_id = request_id
        self._pending = timings
        self._prefilled = prefilled  # the worker's: filled by deliver when the request's prefill ends
        self._first_at: float | None = None

    def stamp(self, delta: TokenDelta) -> TokenDelta:
        self._first_at = self._first_at or time.perf_counter()
        if (prefill := self._prefilled.pop(self.request_id, None)) is not None:
            self._pending = (self._pending or StageTimings()).merge(prefill)
        if delta.finished:
            decode_s = time.perf_counter() - self._first_at
            self._pending = (self._pending or StageTimings()).merge(StageTimings(decode_s=decode_s))
        if self._pending is not None:
            delta.timings, self._pending = self._pending, None
        return delta


class Outbox:
    """Everything queued for one consumer since it last took; `take` waits for the next batch."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[StreamItem] = []
        self.closed = False

    def add(self, item: StreamItem, flush: bool = True) -> None:
        with self._cond:
            self._items.append(item)
            if flush:
                self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            if self._items:
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def take(self, timeout_s: float) -> list[StreamItem]:
        """Everything queued (waiting up to `timeout_s` for something); [] when nothing came."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout_s)
            items, self._items = self._items, []
        return items


class StreamSink:
    """A request's sink in the worker's ledger when its deltas go to a consumer's outbox. `put` takes
    what a per-request queue would: deltas, or the worker's eviction marker."""

    def __init__(self, outbox: Outbox, timings: DeltaTimings, evicted: object) -> None:
        self.outbox = outbox
        self.timings = timings
        self._evicted = evicted

    def put(self, item: TokenDelta | object) -> None:
        """Outside a step (an abort, an eviction): queued and sent at once."""
        if item is self._evicted:
            reason = "the worker gave the request up; it continues elsewhere"
            self.outbox.add(StreamEnd(self.timings.request_id, reason))
        elif isinstance(item, TokenDelta):
            self.outbox.add(self.timings.stamp(item))

    def queue(self, delta: TokenDelta) -> None:
        """Inside a step: queued; the step's `Outbox.flush` sends it with the others."""
        self.outbox.add(self.timings.stamp(delta), flush=False)
