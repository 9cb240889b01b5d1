"""The control plane of one deployment: the pool directory, the actuator, and the health monitor,
on an event loop of their own (a thread), so control work never waits behind request handling.

The health monitor reads every worker's stats each `health_interval_s`. A worker that died (its
process is gone), does not answer within `health_timeout_s`, or reports its engine broken (a wedged
or crashed engine thread) is replaced at once. A pipeline that sees a worker die reports it
(`worker_died`), which takes it out of routing before the next pick.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from serving.config import ControlConfig
from serving.control.actuator import Actuator
from serving.control.directory import PoolDirectory, WorkerEntry
from serving.pipeline import Pipeline
from serving.types import Role, Roles, WorkerPhase, WorkerStats

if TYPE_CHECKING:
    from serving.controller.loop import ControllerLoop
    from serving.stages.factory import WorkerFactory
    from serving.stages.handles import WorkerHandle

T = TypeVar("T")
log = logging.getLogger(__name__)
_CHECKED = (WorkerPhase.ACTIVE, WorkerPhase.DRAINING, WorkerPhase.RECONFIGURING)


class ControlPlane:
    def __init__(
        self,
        factory: WorkerFactory,
        cfg: ControlConfig,
        name_for: Callable[[Roles, int], str],
        first_index: int,
    ) -> None:
        self.cfg = cfg
        self.directory = PoolDirectory()
        self.actuator = Actuator(self.directory, factory, cfg, name_for, first_index)
        self.pipeline = pipeline_over(self.directory, cfg, self.worker_died)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="control-plane", daemon=True)
        self._thread.start()
        self._monitor: concurrent.futures.Future | None = None
        self.controller: ControllerLoop | None = None  # the SLO controller, when one is started
        self._controller_run: concurrent.futures.Future | None = None

    # -- running work on the control loop ----------------------------------------------------------

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await, from any event loop, a coroutine run on the control loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Blocking form of `call`, for synchronous callers."""
        return self.submit(coro).result()

    # -- lifecycle ------------------------------------------------------------------------------------

    def adopt(self, handles: list[WorkerHandle], cpus: dict[str, tuple[int, ...]] | None = None) -> list[str]:
        """Take the deployment's workers and start watching them; returns those that answered."""
        adopted = self.run(self.actuator.adopt(handles, cpus))
        self._monitor = self.submit(self._watch())
        return adopted

    def start_controller(self, controller: ControllerLoop) -> None:
        """Run the SLO controller's ticks on this plane's loop, beside the health monitor."""
        self.controller = controller
        self._controller_run = self.submit(controller.run())

    def worker_died(self, name: str) -> None:
        """A pipeline saw `name` die: no more routing to it; the monitor replaces it. Thread-safe."""
        if self.directory.mark_failed(name):
            log.warning("worker %s seen dead by a request", name)

    def ready(self) -> dict[Role, bool]:
        """Whether each role has a worker taking its work now."""
        return {role: self.directory.serving(role) for role in Role}

    def stop(self) -> None:
        """Stop watching and stop every worker."""
        for task in (self._monitor, self._controller_run):
            if task is not None:
                task.cancel()
        if self.controller is not None:
            with contextlib.suppress(Exception):
                self.submit(self.controller.stop()).result(timeout=10)
        entries = self.directory.entries()
        with contextlib.suppress(Exception):
            self.submit(_stop_all(entries)).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def refresh_stats(self, timeout_s: float = 2.0) -> dict[str, WorkerStats]:
        """Read every live worker's stats now (a scrape wants the latest) and return those that
        answered. Each worker has its own timeout and its own failure: one that is dead, wedged or
        answers with a cancellation is left out (and to the health monitor), never the others."""

        async def one(entry: WorkerEntry) -> WorkerStats:
            async with asyncio.timeout(timeout_s):
                stats = await entry.handle.stats()
            self.directory.update(entry.name, stats=stats)
            return stats

        entries = [e for e in self.directory.entries() if e.phase in _CHECKED]
        # return_exceptions: a failure (even a CancelledError from a dead actor's call) stays with its
        # worker instead of abandoning the gather and every other worker's answer.
        results = await asyncio.gather(*(one(e) for e in entries), return_exceptions=True)
        return {e.name: r for e, r in zip(entries, results, strict=True) if isinstance(r, WorkerStats)}

    # -- health -----------------------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Each tick: check every live worker, then replace every failed one (in the background, so a
        slow start never delays the next checks). Nothing here may end the loop."""
        replacing: dict[str, asyncio.Task] = {}
        while True:
            try:
                entries = [e for e in self.directory.entries() if e.phase in _CHECKED]
                await asyncio.gather(*(self._check(e) for e in entries))
                for entry in self.directory.entries():
                    if entry.phase is WorkerPhase.FAILED and entry.name not in replacing:
                        task = asyncio.create_task(self.actuator.replace(entry.name))
                        replacing[entry.name] = task
                        task.add_done_callback(lambda t, name=entry.name: _finished(replacing, name, t))
            except Exception:  # noqa: BLE001 - logged; the monitor must outlive any one failure
                log.exception("health monitor tick failed")
            await asyncio.sleep(self.cfg.health_interval_s)

    async def _check(self, entry: WorkerEntry) -> None:
        """Fresh stats, or the worker marked failed (dead, unreachable, wedged or engine broken)."""
        try:
            async with asyncio.timeout(self.cfg.health_timeout_s):
                stats = await entry.handle.stats()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - dead, unreachable or wedged: all mean replace
            log.warning("worker %s failed its health check: %s", entry.name, type(exc).__name__)
            self.directory.mark_failed(entry.name)
            return
        if not stats.engine_alive:
            log.warning("worker %s reports its engine stopped", entry.name)
            self.directory.mark_failed(entry.name)
            return
        self.directory.update(entry.name, stats=stats)


def pipeline_over(
    directory: PoolDirectory, cfg: ControlConfig, on_worker_died: Callable[[str], None]
) -> Pipeline:
    """The request pipeline over `directory`, with the deployment's retry, migration and wait limits."""
    return Pipeline(
        directory,
        on_worker_died=on_worker_died,
        max_leg_attempts=cfg.max_leg_attempts,
        max_migrations=cfg.max_migrations,
        wait_for_worker_s=cfg.wait_for_worker_s,
    )


def _finished(replacing: dict[str, asyncio.Task], name: str, task: asyncio.Task) -> None:
    replacing.pop(name, None)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("replacing worker %s failed: %r", name, exc)


async def _stop_all(entries: list[WorkerEntry]) -> None:
    await asyncio.gather(*(_quiet_stop(e.handle) for e in entries), return_exceptions=True)


async def _quiet_stop(handle: WorkerHandle) -> None:
    with contextlib.suppress(Exception):
        await handle.stop()
