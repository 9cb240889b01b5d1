"""The control plane's operations for both front ends (`/admin/*` and the gRPC Admin service): the
pool directory as plain data (this gateway's mirror of it), and the operations, which the control
actor runs on its own loop, so a long drain never blocks request handling."""

from __future__ import annotations

import contextlib
from typing import Any

from serving.api.errors import APIError
from serving.control.client import ControlClient, ControlUnavailable, OperationRefused
from serving.control.directory import WorkerEntry
from serving.control.records import WorkerRecord
from serving.types import Roles, roles_label


def worker_view(entry: WorkerEntry | WorkerRecord, outstanding: int) -> dict[str, Any]:
    """One worker as `epd ctl workers --json` prints it."""
    stats = entry.stats
    return {
        "name": entry.name,
        "roles": roles_label(entry.roles),
        "routing": roles_label(entry.routing),
        "phase": entry.phase.value,
        "pid": stats.pid if stats else (entry.info.pid if entry.info else None),
        "node": stats.node if stats else (entry.info.node if entry.info else None),
        "epoch": entry.info.epoch if entry.info else None,
        "outstanding": outstanding,
        "requests_in_flight": stats.requests_in_flight if stats else 0,
        "kv_cache_usage": round(stats.kv_cache_usage, 4) if stats else 0.0,
        "kv_blocks_total": stats.kv_blocks_total if stats else 0,
        "kv_tokens_total": stats.kv_tokens_total if stats else 0,
        "backend": stats.backend if stats else None,
        "kernels": stats.kernels if stats else None,
        "leases_active": stats.leases_active if stats else 0,
        "restarts": entry.restarts,
        "phase_since": entry.since,
    }


class AdminService:
    def __init__(self, plane: ControlClient) -> None:
        self.plane = plane

    async def workers(self) -> dict[str, Any]:
        """The directory: its version, which roles are served, every worker sorted by name. This
        replica's mirror is brought up to date first, so what an operation did through another
        replica is seen here at once."""
        with contextlib.suppress(Exception):  # the control plane unreachable: the last directory
            await self.plane.sync()
        directory = self.plane.directory
        entries = sorted(directory.entries(), key=lambda e: e.name)
        pid, node = self.plane.control
        return {
            "version": directory.version,
            "control": {"pid": pid, "node": node},
            "ready": {role.value: ok for role, ok in self.plane.ready().items()},
            "workers": [worker_view(e, directory.outstanding.get(e.name, 0)) for e in entries],
        }

    async def decisions(self) -> dict[str, Any]:
        """The SLO controller: its mode, what it saw and predicted last, and its recent decisions."""
        return await self._act(self.plane.decisions())

    async def add(self, roles: Roles) -> dict[str, Any]:
        return worker_view(await self._act(self.plane.add(roles)), 0)

    async def switch(self, name: str, roles: Roles) -> dict[str, Any]:
        return worker_view(await self._act(self.plane.switch(name, roles)), 0)

    async def drain(self, name: str) -> dict[str, Any]:
        return worker_view(await self._act(self.plane.drain(name)), 0)

    async def resume(self, name: str) -> dict[str, Any]:
        return worker_view(await self._act(self.plane.resume(name)), 0)

    async def remove(self, name: str) -> None:
        await self._act(self.plane.remove(name))

    @staticmethod
    async def _act(coro: Any) -> Any:
        try:
            return await coro
        except OperationRefused as exc:
            raise APIError(exc.status, str(exc), code="invalid_worker_operation") from None
        except ControlUnavailable:
            message = "The control plane is restarting; retry shortly."
            raise APIError(503, message, code="control_unavailable", headers={"Retry-After": "2"}) from None
