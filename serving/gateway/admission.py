"""Admission: at most N requests in the stages, a bounded queue behind them, 429 beyond that."""

from __future__ import annotations

import asyncio

from serving.gateway.errors import APIError


class Admission:
    def __init__(self, max_running: int, max_waiting: int) -> None:
        self._slots = asyncio.Semaphore(max_running)
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0

    async def acquire(self) -> None:
        if self._slots.locked() and self.waiting >= self.max_waiting:
            raise APIError(
                429,
                "The server is at capacity; retry shortly.",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._slots.release()
