"""Uniform async access to a worker, whether it is a Ray actor or an object in this process.
The kind is chosen once, when the cluster is built; the pipeline never asks which it has."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from serving.stages.worker import StageWorker


class WorkerHandle:
    name: str
    roles: str
    outstanding: int = 0  # calls in flight, for least-outstanding-work picking

    async def call(self, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        raise NotImplementedError


class LocalHandle(WorkerHandle):
    """A worker in this process; blocking methods run on threads so the event loop stays free."""

    def __init__(self, worker: StageWorker) -> None:
        self.worker, self.name, self.roles = worker, worker.name, worker.cfg.roles

    async def call(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.worker, method), *args)

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        done = object()
        stop = threading.Event()

        def produce() -> None:
            gen = getattr(self.worker, method)(*args)
            try:
                for item in gen:
                    loop.call_soon_threadsafe(items.put_nowait, item)
                    if stop.is_set():
                        break
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                loop.call_soon_threadsafe(items.put_nowait, exc)
            finally:
                gen.close()
                loop.call_soon_threadsafe(items.put_nowait, done)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while (item := await items.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


class RayHandle(WorkerHandle):
    def __init__(self, actor: Any, name: str, roles: str) -> None:
        self.actor, self.name, self.roles = actor, name, roles

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.actor, method).remote(*args)

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        refs = getattr(self.actor, method).options(num_returns="streaming").remote(*args)
        async for ref in refs:
            yield await ref


class Pool:
    """The workers serving one role set; picks the one with the least outstanding work."""

    def __init__(self, roles: str, handles: list[WorkerHandle]) -> None:
        self.roles, self.handles = roles, handles

    def pick(self, exclude: WorkerHandle | None = None) -> WorkerHandle:
        candidates = [h for h in self.handles if h is not exclude] or self.handles
        return min(candidates, key=lambda h: h.outstanding)
