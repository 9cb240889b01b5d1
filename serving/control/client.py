"""A gateway replica's side of the control actor: a local mirror of the pool directory (kept by
polling versioned snapshots), the request pipeline over it with this replica's own load counts, and
the operations and reports that go to the actor.

A worker this replica sees die leaves its routing at once and is reported; the mirror keeps it out
until the actor's directory drops it (a replaced worker comes back under a new name). While the actor
cannot be reached (restarting), the replica keeps serving from the last directory it had."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from serving.config import ControlConfig
from serving.control.actuator import StartingHandle
from serving.control.directory import PoolDirectory, WorkerEntry
from serving.control.plane import pipeline_over
from serving.control.records import (
    REPORT_INTERVAL_S,
    ControlReport,
    DirectorySnapshot,
    GatewayReport,
    OpRefused,
    WorkerRecord,
)
from serving.controller.observation import Kind, RequestRecord
from serving.stages.handles import WorkerHandle
from serving.types import Role, Roles, WorkerPhase, WorkerStats

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often the mirror asks for a newer directory (an unchanged one costs one small call)
_UP = (WorkerPhase.ACTIVE, WorkerPhase.DRAINING, WorkerPhase.RECONFIGURING)


class ControlUnavailable(Exception):
    """The control actor did not answer (it is restarting): the operation may be retried."""


class OperationRefused(Exception):
    """The control plane refused an operation: `status` 404 (no such worker) or 409 (its state)."""

    def __init__(self, refused: OpRefused) -> None:
        super().__init__(refused.message)
        self.status = refused.status


class ForwardingWindow:
    """Stands in for the SLO controller's request window in a gateway: what the metrics record goes,
    on the wall clock, to the control actor with this replica's next report."""

    def __init__(self) -> None:
        self._arrivals: list[tuple[float, Kind]] = []
        self._records: list[RequestRecord] = []
        self._wall = time.time() - time.perf_counter()  # this process's perf_counter → wall clock

    def arrive(self, at: float, kind: Kind) -> None:
        self._arrivals.append((at + self._wall, kind))

    def add(self, record: RequestRecord) -> None:
        wall = self._wall
        self._records.append(replace(record, arrival=record.arrival + wall, end=record.end + wall))

    def take(self) -> tuple[list[tuple[float, Kind]], list[RequestRecord]]:
        taken = self._arrivals, self._records
        self._arrivals, self._records = [], []
        return taken


class ControlClient:
    def __init__(
        self,
        actor: Any,
        cfg: ControlConfig,
        gateway_id: str,
        resolve: Callable[[str], WorkerHandle],
        forward_requests: bool = False,
    ) -> None:
        self.actor, self.gateway_id, self._resolve = actor, gateway_id, resolve
        self.directory = PoolDirectory()
        self.pipeline = pipeline_over(self.directory, cfg, self.worker_died)
        self.window = ForwardingWindow() if forward_requests else None
        self.report = ControlReport()  # the deployment's counters, as of the latest scrape
        self.admission_limit: int | None = None  # this replica's share of the controller's limit
        self.on_admission_limit: Callable[[int], None] | None = None
        self.control: tuple[int, str] = (0, "")  # the control actor's pid and node, as last seen
        self.gateways = 1  # gateway replicas the control actor hears from
        self.exposition: Callable[[], bytes] | None = None  # this replica's own metrics
        self.replicas: dict[str, bytes] = {}  # the other replicas' metrics, as of the latest scrape
        self.running: Callable[[], int] = lambda: 0  # requests this replica has admitted or queued
        self.on_shutdown: Callable[[], None] | None = None  # the deployment is stopping
        self._handles: dict[str, WorkerHandle] = {}
        self._dead: set[str] = set()  # seen dead here; kept out until the actor's directory drops them
        self._known: tuple[int, int | None, int, bool] | None = None
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """The first directory (the actor answers once it has adopted the workers), then follow it."""
        await self.sync()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._report())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task

    async def sync(self) -> None:
        """Apply the actor's directory if it changed since the last one applied."""
        snapshot = await self._call(self.actor.snapshot.remote(self._known))
        if snapshot is not None:
            await self._apply(snapshot)

    async def _follow(self) -> None:
        failing = False
        while True:
            try:
                await self.sync()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the last directory; the actor restarts
                if not failing:
                    log.warning("control plane unreachable (%s): serving from the last directory", exc)
                failing = True
            await asyncio.sleep(POLL_S)

    async def _report(self) -> None:
        """This replica's requests for the controller's window (and its metrics, when there are other
        replicas to answer scrapes with them); also its heartbeat."""
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            arrivals, records = self.window.take() if self.window is not None else ([], [])
            report = GatewayReport(self.gateway_id, arrivals, records, running=self.running())
            if self.gateways > 1 and self.exposition is not None:
                report.exposition = self.exposition()
            with contextlib.suppress(Exception):  # records of a restart's gap are lost, not retried
                await self._call(self.actor.report.remote(report))

    async def _apply(self, snapshot: DirectorySnapshot) -> None:
        seen = {r.name for r in snapshot.workers}
        for record in snapshot.workers:
            handle = await self._handle(record)
            routing, phase = record.routing, record.phase
            # Seen dead here (until the actor drops it), or not found by name now (tried again with the
            # next snapshot): listed, not routed.
            if phase in _UP and (record.name in self._dead or handle is None):
                phase, routing = WorkerPhase.FAILED, frozenset()
            handle = handle or StartingHandle(record.name)
            self.directory.put(
                WorkerEntry(
                    record.name,
                    handle,
                    record.roles,
                    phase,
                    routing,
                    record.info,
                    record.stats,
                    record.restarts,
                    record.cpus,
                    record.since,
                )  # fmt: skip
            )
        for entry in self.directory.entries():
            if entry.name not in seen:
                self.directory.remove(entry.name)
                self._handles.pop(entry.name, None)
                self._dead.discard(entry.name)
        self._known = (snapshot.version, snapshot.admission_limit, snapshot.gateways, snapshot.shutting_down)
        if snapshot.shutting_down and self.on_shutdown is not None:
            self.on_shutdown()
        self.control = (snapshot.control_pid, snapshot.control_node)
        self.gateways = snapshot.gateways
        if snapshot.admission_limit is not None:
            share = max(1, -(-snapshot.admission_limit // snapshot.gateways))
            if share != self.admission_limit:
                self.admission_limit = share
                if self.on_admission_limit is not None:
                    self.on_admission_limit(share)

    async def _handle(self, record: WorkerRecord) -> WorkerHandle | None:
        """The worker's handle in this process; None when it is up but cannot be found by name."""
        if (known := self._handles.get(record.name)) is not None:
            return known
        if record.phase not in _UP:
            return StartingHandle(record.name)
        try:
            handle = await asyncio.to_thread(self._resolve, record.name)
        except Exception:  # noqa: BLE001 - gone since the actor listed it, or not yet visible
            return None
        self._handles[record.name] = handle
        return handle

    async def _call(self, ref: Any) -> Any:
        try:
            return await ref
        except (asyncio.CancelledError, OperationRefused):
            raise
        except Exception as exc:
            raise ControlUnavailable(str(exc)) from None

    # -- what the gateway reads -------------------------------------------------------------------------

    def ready(self) -> dict[Role, bool]:
        """Whether each role has a worker taking its work now."""
        return {role: self.directory.serving(role) for role in Role}

    def worker_died(self, name: str) -> None:
        """This replica's pipeline saw `name` die: no more routing to it here; the actor is told (its
        monitor replaces the worker). Called on the gateway's event loop."""
        if self.directory.mark_failed(name):
            log.warning("worker %s seen dead by a request", name)
        self._dead.add(name)
        self._spawn(self._call(self.actor.worker_died.remote(name)))

    async def refresh_stats(self, timeout_s: float = 2.0) -> dict[str, WorkerStats]:
        """Every live worker's fresh stats, read by the actor; the deployment's counters and the other
        replicas' metrics come with them."""
        ref = self.actor.stats.remote(timeout_s, self.gateway_id)
        answered, self.report, self.replicas = await self._call(ref)
        for name, stats in answered.items():
            self.directory.update(name, stats=stats)
        return answered

    async def begin_shutdown(self) -> None:
        """Every gateway of the deployment stops admitting (each learns it from its next snapshot)."""
        await self._call(self.actor.begin_shutdown.remote())

    async def running_elsewhere(self) -> int | None:
        """Requests the other gateways still run (None: not every one has reported since the stop)."""
        return await self._call(self.actor.running_elsewhere.remote(self.gateway_id))

    async def decisions(self) -> dict[str, Any]:
        return await self._call(self.actor.decisions.remote())

    # -- operations -------------------------------------------------------------------------------------

    async def add(self, roles: Roles) -> WorkerRecord:
        return await self._operate(self.actor.add.remote(roles))

    async def switch(self, name: str, roles: Roles) -> WorkerRecord:
        return await self._operate(self.actor.switch.remote(name, roles))

    async def drain(self, name: str) -> WorkerRecord:
        return await self._operate(self.actor.drain.remote(name))

    async def resume(self, name: str) -> WorkerRecord:
        return await self._operate(self.actor.resume.remote(name))

    async def remove(self, name: str) -> None:
        await self._operate(self.actor.remove.remote(name))

    async def _operate(self, ref: Any) -> Any:
        result = await self._call(ref)
        if isinstance(result, OpRefused):
            raise OperationRefused(result)
        with contextlib.suppress(ControlUnavailable):
            await self.sync()  # what the caller did is in this replica's directory when it returns
        return result

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(_quietly(coro))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _quietly(coro: Any) -> None:
    with contextlib.suppress(Exception):
        await coro
