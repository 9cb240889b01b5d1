"""Typed async handles on a worker, whether it is a Ray actor or an object in this process.

The pipeline and the control plane call these methods and nothing else; the kind of handle is chosen
once, when a worker is started. Failures come out as the typed errors of `serving.types`: a Ray actor
that died is `WorkerDied`, whatever the worker raised keeps its class. Control calls (stats, cancel,
drain, role and peer changes) run in the actor's own concurrency group, so they never queue behind
decode streams. This module imports neither torch nor Ray at import time.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import threading
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from serving.types import (
    EmbeddingRef,
    KVRef,
    PrefillResult,
    PromptSpec,
    RequestFailed,
    Roles,
    SamplingParams,
    TokenDelta,
    WorkerDied,
    WorkerError,
    WorkerInfo,
    WorkerStats,
    WorkerUnavailable,
)

if TYPE_CHECKING:
    import numpy as np

    from serving.stages.worker import StageWorker

CONTROL_GROUP = "control"


class WorkerHandle(abc.ABC):
    """One worker, as the orchestrator and the control plane see it."""

    name: str

    # -- data plane ---------------------------------------------------------------------------------

    async def encode(self, request_id: str, images: list[Any], keep: list[int] | None = None) -> EmbeddingRef:
        return await self._call("encode", request_id, images, keep)

    async def prefill(
        self,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        embeddings: EmbeddingRef | None,
        images: list[np.ndarray] | None,
        resume: list[int] | None = None,
    ) -> PrefillResult:
        return await self._call("prefill", request_id, spec, params, embeddings, images, resume)

    def decode(
        self,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        kv: KVRef,
        restored: list[int] | None = None,
    ) -> AsyncIterator[TokenDelta]:
        return self._stream("decode", request_id, spec, params, kv, restored)

    def generate(
        self,
        request_id: str,
        spec: PromptSpec,
        params: SamplingParams,
        embeddings: EmbeddingRef | None,
        images: list[np.ndarray] | None,
        resume: list[int] | None = None,
    ) -> AsyncIterator[TokenDelta]:
        return self._stream("generate", request_id, spec, params, embeddings, images, resume)

    # -- control plane ------------------------------------------------------------------------------

    async def info(self) -> WorkerInfo:
        return await self._control("info")

    async def stats(self) -> WorkerStats:
        return await self._control("stats")

    async def cancel(self, request_id: str) -> None:
        await self._control("cancel", request_id)

    async def stop_accepting(self, roles: Roles) -> int:
        return await self._control("stop_accepting", roles)

    async def using(self, roles: Roles) -> int:
        return await self._control("using", roles)

    async def evict(self, roles: Roles) -> int:
        return await self._control("evict", roles)

    async def set_roles(self, roles: Roles) -> WorkerInfo:
        return await self._control("set_roles", roles)

    async def add_peer(self, metadata: bytes, epoch: int, name: str) -> str:
        return await self._control("add_peer", metadata, epoch, name)

    async def remove_peer(self, name: str) -> None:
        await self._control("remove_peer", name)

    async def inject_fault(self, stage: str, request_id: str) -> None:
        await self._control("inject_fault", stage, request_id)

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the worker for good (shut it down, or kill a process that does not answer)."""

    # -- how calls travel ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def _call(self, method: str, *args: Any) -> Any: ...

    @abc.abstractmethod
    async def _control(self, method: str, *args: Any) -> Any: ...

    @abc.abstractmethod
    def _stream(self, method: str, *args: Any) -> AsyncIterator[TokenDelta]: ...


class LocalHandle(WorkerHandle):
    """A worker in this process; blocking methods run on threads so the event loop stays free."""

    def __init__(self, worker: StageWorker) -> None:
        self.worker, self.name = worker, worker.name

    async def stop(self) -> None:
        await asyncio.to_thread(self.worker.shutdown)

    async def _call(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.worker, method), *args)

    _control = _call  # in one process, control calls already have threads of their own

    async def _stream(self, method: str, *args: Any) -> AsyncIterator[TokenDelta]:
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        done = object()
        stop = threading.Event()

        def post(item: Any) -> None:
            # The consumer's loop may have closed already (its caller finished): nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(items.put_nowait, item)

        def produce() -> None:
            gen = getattr(self.worker, method)(*args)
            try:
                for item in gen:
                    post(item)
                    if stop.is_set():
                        break
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                post(exc)
            finally:
                gen.close()
                post(done)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while (item := await items.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


class _Subscription:
    """This process's one stream from a worker: each item is one engine step's deltas for every request
    streamed from it here, routed to the requests' queues. Ended by the worker's death, it fails every
    open request with the typed error and is reopened by the next request."""

    def __init__(self, actor: Any, name: str) -> None:
        self.actor, self.name = actor, name
        self.consumer = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.queues: dict[str, asyncio.Queue] = {}
        self._pump: asyncio.Task | None = None

    def open(self, request_id: str) -> asyncio.Queue:
        items: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = items
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run())
        return items

    def close(self, request_id: str, items: asyncio.Queue) -> None:
        if self.queues.get(request_id) is items:
            del self.queues[request_id]

    async def _run(self) -> None:
        try:
            with _typed_errors(self.name):
                refs = self.actor.subscribe.options(num_returns="streaming").remote(self.consumer)
                async for ref in refs:
                    for item in await ref:
                        if (items := self.queues.get(item.request_id)) is not None:
                            items.put_nowait(item)
            raise WorkerUnavailable(f"worker {self.name} stopped streaming")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to every request waiting here
            for items in self.queues.values():
                items.put_nowait(exc)


class RayHandle(WorkerHandle):
    def __init__(self, actor: Any, name: str) -> None:
        self.actor, self.name = actor, name
        self._subscriptions: dict[int, _Subscription] = {}  # per event loop
        self._cancels: set[asyncio.Task] = set()

    async def stop(self) -> None:
        import ray

        try:
            async with asyncio.timeout(10):
                await self.actor.shutdown.options(concurrency_group=CONTROL_GROUP).remote()
        except BaseException:  # noqa: BLE001 - a worker that does not stop cleanly is killed
            pass
        ray.kill(self.actor, no_restart=True)

    async def _call(self, method: str, *args: Any) -> Any:
        with _typed_errors(self.name):
            return await getattr(self.actor, method).remote(*args)

    async def _control(self, method: str, *args: Any) -> Any:
        with _typed_errors(self.name):
            return await getattr(self.actor, method).options(concurrency_group=CONTROL_GROUP).remote(*args)

    async def _stream(self, method: str, *args: Any) -> AsyncIterator[TokenDelta]:
        """The request starts with one call; its deltas come through this process's subscription to
        the worker, which carries one message per engine step for all its requests."""
        from serving.stages.outbox import StreamEnd

        loop = asyncio.get_running_loop()
        sub = self._subscriptions.get(id(loop))
        if sub is None:
            sub = self._subscriptions[id(loop)] = _Subscription(self.actor, self.name)
        request_id = args[0]
        items = sub.open(request_id)
        finished = False
        try:
            with _typed_errors(self.name):
                await getattr(self.actor, f"start_{method}").remote(sub.consumer, *args)
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, StreamEnd):
                    raise WorkerUnavailable(item.reason)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            sub.close(request_id, items)
            if not finished:
                # The consumer went away mid-stream: free the request on the worker, as closing a
                # per-request stream did.
                task = loop.create_task(self._cancel_quietly(request_id))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)

    async def _cancel_quietly(self, request_id: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await self._control("cancel", request_id)


class _typed_errors:  # noqa: N801 - used as a context manager, reads like a function
    """Ray's errors as ours: a dead or unreachable actor is WorkerDied; what the worker raised keeps
    its class (Ray re-raises it as a subclass of the cause); anything else is the request's failure."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, asyncio.CancelledError | GeneratorExit):
            return False
        from ray.exceptions import RayActorError, RayTaskError

        if isinstance(exc, RayActorError):
            raise WorkerDied(f"worker {self.name} died") from exc
        if isinstance(exc, RayTaskError):
            cause = exc.cause
            if isinstance(cause, RayActorError):
                raise WorkerDied(f"worker {self.name} died") from exc
            if isinstance(cause, RequestFailed):
                raise cause from exc  # its type and fields (a stage, a client's rejection) intact
            if isinstance(cause, WorkerError):
                raise type(cause)(str(cause)) from exc
            raise RequestFailed(f"worker {self.name} failed the request") from exc
        return False
