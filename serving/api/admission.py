"""Admission by the real work: a request costs its sequences (prompts × n), and holds its images'
declared pixels while it lives. At most `max_sequences` sequences run in the stages at once (a single
request larger than that runs alone), a bounded FIFO queue waits behind them, and beyond that, or when
the images in flight would pass the gateway's pixel budget, the answer is 429 with Retry-After.

A request is admitted before its images are fetched or decoded, so a slow image host or a pile of
image headers occupies admission slots (and meets 429s) instead of gateway memory.
"""

from __future__ import annotations

import asyncio
from collections import deque

from serving.api.errors import APIError


def _overloaded(message: str) -> APIError:
    return APIError(429, message, code="queue_full", headers={"Retry-After": "1"})


class Ticket:
    """What one admitted request holds until it ends. `release` is idempotent."""

    def __init__(self, admission: Admission, sequences: int) -> None:
        self._admission = admission
        self.sequences = sequences
        self.pixels = 0
        self.released = False

    def charge_pixels(self, pixels: int) -> None:
        """Hold `pixels` more of the gateway's in-flight image budget (429 when it is spent)."""
        a = self._admission
        if self.released:
            raise RuntimeError("ticket already released")
        if a.pixels + pixels > a.max_pixels:
            raise _overloaded("The server is handling too many images; retry shortly.")
        a.pixels += pixels
        self.pixels += pixels

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._admission._release(self)

    def __del__(self) -> None:
        # A safety net: a streaming response whose client left before its generator first ran never
        # reaches the generator's `finally`; its ticket is freed when the generator is collected.
        if not self.released:
            self.release()


class Admission:
    def __init__(self, max_sequences: int, max_waiting: int, max_pixels: int = 2**62) -> None:
        self.max_sequences, self.max_waiting, self.max_pixels = max_sequences, max_waiting, max_pixels
        self.running = 0  # requests admitted
        self.sequences = 0  # their sequences
        self.pixels = 0  # their images' declared pixels
        self._queue: deque[tuple[int, asyncio.Future[Ticket]]] = deque()
        self.closed = False

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _fits(self, sequences: int) -> bool:
        return self.running == 0 or self.sequences + sequences <= self.max_sequences

    def close(self) -> None:
        """Shutting down: every later acquire is refused with 503 + Retry-After."""
        self.closed = True

    async def acquire(self, sequences: int = 1) -> Ticket:
        """Wait (FIFO) until `sequences` more fit; 429 when the queue is full."""
        if self.closed:
            raise APIError(
                503, "The server is shutting down; retry shortly.", code="shutting_down",
                headers={"Retry-After": "5"},
            )  # fmt: skip
        if not self._queue and self._fits(sequences):
            return self._admit(sequences)
        if len(self._queue) >= self.max_waiting:
            raise _overloaded("The server is at capacity; retry shortly.")
        waiter: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        entry = (sequences, waiter)
        self._queue.append(entry)
        try:
            return await waiter
        except asyncio.CancelledError:
            if entry in self._queue:
                self._queue.remove(entry)
            elif waiter.done() and not waiter.cancelled():
                waiter.result().release()  # admitted as we were cancelled: give it back
            self._wake()
            raise

    def _admit(self, sequences: int) -> Ticket:
        self.running += 1
        self.sequences += sequences
        return Ticket(self, sequences)

    def _release(self, ticket: Ticket) -> None:
        self.running -= 1
        self.sequences -= ticket.sequences
        self.pixels -= ticket.pixels
        self._wake()

    def set_limit(self, max_sequences: int) -> None:
        """A new concurrent-sequence limit (the SLO controller's); a raise admits who now fits.
        Call it on the event loop that runs the admission."""
        self.max_sequences = max(max_sequences, 1)
        self._wake()

    def _wake(self) -> None:
        # In order: a large request at the head is not overtaken by smaller ones behind it.
        while self._queue and self._fits(self._queue[0][0]):
            sequences, waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(self._admit(sequences))
