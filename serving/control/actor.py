"""The control plane of one deployment as a detached, named Ray actor (`control.<deployment id>`):
the pool directory, the actuator, the health monitor and the SLO controller, in one place whatever
the number of gateway replicas in front.

Gateways read the directory as versioned snapshots (`snapshot`), report the workers they see die
(`worker_died`) and what their requests did (`report`), and ask for operations (`add`, `switch`, …).
The actor owns membership: it records the deployment's workers (names, roles, pinned CPUs) in Ray's
GCS key-value store at each change, and on a restart (Ray restarts it: `max_restarts=-1`) adopts
the workers still alive by the deployment's id and starts one in place of each recorded worker that
died meanwhile (unless a live worker the record does not yet know already stands in for it), so
nothing is orphaned, nothing is lost and nothing is replaced twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from serving.control.actuator import ActuatorError
from serving.control.records import (
    REPORT_INTERVAL_S,
    ControlReport,
    DirectorySnapshot,
    GatewayReport,
    OpRefused,
    WorkerRecord,
)
from serving.controller.window import RequestWindow
from serving.types import Roles, WorkerPhase, WorkerStats, parse_roles, roles_label

if TYPE_CHECKING:
    from serving.control.plane import ControlPlane
    from serving.gateway.serve import GatewaySettings

log = logging.getLogger(__name__)

# A gateway not heard from for this long no longer counts towards the admission limit's split.
GATEWAY_TTL_S = 10 * REPORT_INTERVAL_S
_MEMBERSHIP_EVERY_S = 0.5
_KV_NAMESPACE = b"epd"


Member = tuple[Roles, tuple[int, ...], int]  # a recorded worker's roles, pinned CPUs and restarts


def lost_workers(
    recorded: dict[str, Member], live: dict[str, Roles]
) -> tuple[dict[str, Member], dict[str, tuple[str, Member]]]:
    """The recorded workers to start again after a restart (not alive), and the live workers the
    record does not know that already stand in for one of them (stand-in → the lost one it
    replaces). The record is written within half a second of each change, so an actor that goes down
    just after starting a replacement finds the replacement alive and the failed worker still
    recorded: matched by roles, the failure is replaced once, not twice."""
    unknown = [name for name in live if name not in recorded]
    lost: dict[str, Member] = {}
    stand_ins: dict[str, tuple[str, Member]] = {}
    for name, member in recorded.items():
        if name in live:
            continue
        twin = next((n for n in unknown if live[n] == member[0]), None)
        if twin is None:
            lost[name] = member
        else:
            unknown.remove(twin)
            stand_ins[twin] = (name, member)
    return lost, stand_ins


def control_name(cluster_id: str) -> str:
    """The actor's name; not of the `<roles>-<index>-<id>` form that finds the deployment's workers."""
    return f"control.{cluster_id}"


class ControlService:
    """The actor's body. Everything runs on the control plane's own loop (a thread), so a long drain
    or a slow start never delays a gateway's snapshot."""

    def __init__(self, settings: GatewaySettings) -> None:
        import ray

        from serving.control.plane import ControlPlane
        from serving.stages.factory import (
            NAMESPACE,
            RayWorkerFactory,
            deployment_workers,
            worker_index,
            worker_name,
        )
        from serving.stages.handles import RayHandle

        self.settings = settings
        cid = settings.cluster_id
        # Workers started here (added, or in place of failed ones) are detached: they outlive this
        # actor, which adopts them again when Ray restarts it.
        template, gpus = settings.worker_template, settings.gpus_per_worker
        factory = RayWorkerFactory(template, NAMESPACE, gpus, settings.role_resources, detached=True)
        recorded = self._recorded() or {}
        # The deployment's workers as they are now, found by its id: the ones `epd serve` started and
        # any added or started in place of failed ones since.
        live = deployment_workers(ray.util.list_named_actors(all_namespaces=True), cid)
        live = live or [name for name, _ in settings.workers]
        indices = [worker_index(n, cid) for n in (*live, *recorded)]
        first_index = max(1 + max(indices, default=-1), len(settings.workers))
        self.plane: ControlPlane = ControlPlane(
            factory, settings.control, lambda roles, i: worker_name(roles, i, cid), first_index
        )
        handles = []
        for name in live:
            with contextlib.suppress(ValueError):  # gone since it was listed
                handles.append(RayHandle(ray.get_actor(name, namespace=NAMESPACE), name))
        cpus = dict(settings.workers) | {n: rec[1] for n, rec in recorded.items()}
        adopted = self.plane.adopt(handles, cpus)
        for name in adopted:
            if name in recorded:
                self.plane.directory.update(name, restarts=recorded[name][2])
        live_roles = {name: entry.roles for name in adopted if (entry := self.plane.directory.get(name))}
        lost, stand_ins = lost_workers(recorded, live_roles)
        for stand_in, (lost_name, (_, pinned, restarts)) in stand_ins.items():
            log.warning(
                "worker %s already stands in for %s, which died: not replaced twice", stand_in, lost_name
            )
            self.plane.directory.update(stand_in, cpus=pinned, restarts=restarts + 1)
        # Recorded workers that died while no control plane watched: started again under new names.
        for name, (roles, pinned, restarts) in lost.items():
            log.warning("worker %s died while the control plane was down: one starts in its place", name)
            self.plane.submit(self._restore(roles, pinned, restarts))
        self.window = RequestWindow()
        self.admission_limit: int | None = None
        self._gateways: dict[str, float] = {}  # gateway → when it last reported (wall clock)
        self._expositions: dict[str, bytes] = {}  # gateway → its metrics as it last reported them
        self._running: dict[str, int] = {}  # gateway → requests it last reported admitted or queued
        self.shutting_down = False
        self._shutdown_at = 0.0
        self._clock = time.perf_counter() - time.time()  # wall → this process's perf_counter
        self._node = socket.gethostname()
        if settings.controller.mode != "off":
            from serving.controller.build import build_controller

            self.plane.start_controller(build_controller(settings, self.plane, self.window, self._set_limit))
        self._membership = self.plane.submit(self._record_membership())

    # -- what gateways read ---------------------------------------------------------------------------

    def snapshot(self, known: tuple[int, int | None, int, bool] | None = None) -> DirectorySnapshot | None:
        """The directory as data; None when it is what the caller `known` (version, limit, gateways,
        shutting down)."""
        directory = self.plane.directory
        state = (directory.version, self.admission_limit, self.gateways(), self.shutting_down)
        if known == state:
            return None
        return DirectorySnapshot(
            version=state[0],
            workers=tuple(e.record() for e in directory.entries()),
            admission_limit=state[1],
            gateways=state[2],
            control_pid=os.getpid(),
            control_node=self._node,
            shutting_down=self.shutting_down,
        )

    def gateways(self) -> int:
        now = time.time()
        return max(1, sum(1 for seen in self._gateways.values() if now - seen < GATEWAY_TTL_S))

    async def stats(
        self, timeout_s: float = 2.0, asker: str = ""
    ) -> tuple[dict[str, WorkerStats], ControlReport, dict[str, bytes]]:
        """Fresh stats of every live worker (a scrape wants the latest), the deployment's counters,
        and the metrics the other live gateways last reported."""
        answered = await self.plane.call(self.plane.refresh_stats(timeout_s))
        now = time.time()
        others = {
            g: text
            for g, text in self._expositions.items()
            if g != asker and now - self._gateways.get(g, 0.0) < GATEWAY_TTL_S
        }
        return answered, self.report_now(), others

    def report_now(self) -> ControlReport:
        controller = self.plane.controller
        summary = None if controller is None else controller.summary()
        counters = replace(self.plane.actuator.counters)
        counters.switch_seconds = list(counters.switch_seconds[-1:])
        return ControlReport(counters=counters, controller=summary)

    def decisions(self) -> dict[str, Any]:
        controller = self.plane.controller
        return {"mode": "off", "decisions": []} if controller is None else controller.snapshot()

    # -- what gateways tell ---------------------------------------------------------------------------

    def worker_died(self, name: str) -> None:
        self.plane.worker_died(name)

    def report(self, report: GatewayReport) -> None:
        """A gateway's arrivals and finished requests (wall clock) into the controller's window."""
        now = time.time()
        self._gateways[report.gateway] = now
        self._running[report.gateway] = report.running
        if report.exposition is not None:
            self._expositions[report.gateway] = report.exposition
        for gone in [g for g, seen in self._gateways.items() if now - seen > 6 * GATEWAY_TTL_S]:
            self._gateways.pop(gone, None)
            self._expositions.pop(gone, None)
        shift = self._clock
        for at, kind in report.arrivals:
            self.window.arrive(at + shift, kind)
        for record in report.records:
            self.window.add(replace(record, arrival=record.arrival + shift, end=record.end + shift))

    def begin_shutdown(self) -> None:
        """The deployment is stopping: every gateway learns it from its next snapshot and stops
        admitting; `running_elsewhere` then says when their requests have ended."""
        if not self.shutting_down:
            self.shutting_down, self._shutdown_at = True, time.time()

    def running_elsewhere(self, asker: str) -> int | None:
        """Requests the other live gateways still run; None until each has reported since the stop
        began (its count may predate its last admission)."""
        settle = self._shutdown_at + 2 * REPORT_INTERVAL_S
        others = [
            g for g, seen in self._gateways.items() if g != asker and time.time() - seen < GATEWAY_TTL_S
        ]
        if any(self._gateways[g] < settle for g in others):
            return None
        return sum(self._running.get(g, 0) for g in others)

    # -- operations (`epd ctl`, the admin APIs) -----------------------------------------------------

    async def add(self, roles: Roles) -> WorkerRecord | OpRefused:
        return await self._act(self.plane.actuator.add(roles))

    async def switch(self, name: str, roles: Roles) -> WorkerRecord | OpRefused:
        return await self._act(self.plane.actuator.switch(name, roles))

    async def drain(self, name: str) -> WorkerRecord | OpRefused:
        return await self._act(self.plane.actuator.drain(name))

    async def resume(self, name: str) -> WorkerRecord | OpRefused:
        return await self._act(self.plane.actuator.resume(name))

    async def remove(self, name: str) -> None | OpRefused:
        return await self._act(self.plane.actuator.remove(name))

    async def _act(self, coro: Any) -> Any:
        try:
            entry = await self.plane.call(coro)
        except ActuatorError as exc:
            return OpRefused(404 if str(exc).startswith("no worker") else 409, str(exc))
        return None if entry is None else entry.record()

    async def _restore(self, roles: Roles, cpus: tuple[int, ...], restarts: int) -> None:
        counters = self.plane.actuator.counters
        counters.failures += 1
        if counters.restarts >= self.settings.control.max_worker_restarts:
            log.error("restart limit reached: a %s worker is not replaced", roles_label(roles))
            return
        counters.restarts += 1
        try:
            await self.plane.actuator.add(roles, cpus, restarts=restarts + 1)
        except Exception:  # noqa: BLE001 - logged; the health monitor does not see what never started
            log.exception("starting a %s worker in place of a lost one failed", roles_label(roles))

    # -- membership ---------------------------------------------------------------------------------

    def _set_limit(self, limit: int) -> None:
        self.admission_limit = limit

    def _key(self) -> bytes:
        return f"membership/{self.settings.cluster_id}".encode()

    def _recorded(self) -> dict[str, Member] | None:
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(self._key(), namespace=_KV_NAMESPACE)
        if raw is None:
            return None
        return {
            w["name"]: (parse_roles(w["roles"]), tuple(w["cpus"]), int(w["restarts"]))
            for w in json.loads(raw)
        }

    async def _record_membership(self) -> None:
        """Write the deployment's workers to the GCS whenever they change (not their stats)."""
        from ray.experimental import internal_kv

        written = None
        while True:
            members = sorted(
                (e.name, roles_label(e.roles), e.cpus, e.restarts)
                for e in self.plane.directory.entries()
                if e.phase is not WorkerPhase.STOPPED
            )
            if members != written:
                value = json.dumps(
                    [{"name": n, "roles": r, "cpus": list(c), "restarts": k} for n, r, c, k in members]
                )
                try:
                    put = functools.partial(internal_kv._internal_kv_put, namespace=_KV_NAMESPACE)
                    await asyncio.to_thread(put, self._key(), value.encode())
                    written = members
                except Exception:  # noqa: BLE001 - tried again at the next change check
                    log.exception("recording the deployment's workers failed")
            await asyncio.sleep(_MEMBERSHIP_EVERY_S)


def control_actor(settings: GatewaySettings) -> Any:
    """The deployment's control actor: started by the first gateway replica, found by the others and
    by every replica that restarts (one per deployment id, whoever asks first)."""
    import ray

    from serving.stages.factory import GATEWAY_RESOURCE, NAMESPACE

    options: dict[str, Any] = {
        "name": control_name(settings.cluster_id),
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_restarts": -1,
        "num_cpus": 0,
        "max_concurrency": 1000,
    }
    if settings.role_resources:  # on Kubernetes beside the gateway, on the head
        options["resources"] = {GATEWAY_RESOURCE: 0.01}
    return ray.remote(ControlService).options(**options).remote(settings)
