"""The admin API (`/admin/...`): the pool directory as JSON, and the actuator's operations. What
`epd ctl` calls; behind the API key when keys are configured. Operations run on the control plane's
own event loop, so a long drain never blocks request handling."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse, Response

from serving.control.actuator import ActuatorError
from serving.control.directory import WorkerEntry
from serving.control.plane import ControlPlane
from serving.gateway.errors import APIError
from serving.types import parse_roles, roles_label


def worker_json(entry: WorkerEntry, outstanding: int) -> dict[str, Any]:
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
        "leases_active": stats.leases_active if stats else 0,
        "restarts": entry.restarts,
        "phase_since": entry.since,
    }


class AdminAPI:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def workers(self) -> Response:
        directory = self.plane.directory
        entries = sorted(directory.entries(), key=lambda e: e.name)
        body = {
            "version": directory.version,
            "ready": {role.value: ok for role, ok in self.plane.ready().items()},
            "workers": [worker_json(e, directory.outstanding.get(e.name, 0)) for e in entries],
        }
        return JSONResponse(body)

    async def add(self, raw: bytes) -> Response:
        roles = self._roles(raw)
        entry = await self._act(self.plane.actuator.add(roles))
        return JSONResponse(worker_json(entry, 0), status_code=201)

    async def switch(self, name: str, raw: bytes) -> Response:
        roles = self._roles(raw)
        entry = await self._act(self.plane.actuator.switch(name, roles))
        return JSONResponse(worker_json(entry, 0))

    async def drain(self, name: str) -> Response:
        entry = await self._act(self.plane.actuator.drain(name))
        return JSONResponse(worker_json(entry, 0))

    async def resume(self, name: str) -> Response:
        entry = await self._act(self.plane.actuator.resume(name))
        return JSONResponse(worker_json(entry, 0))

    async def remove(self, name: str) -> Response:
        await self._act(self.plane.actuator.remove(name))
        return JSONResponse({"name": name, "removed": True})

    async def _act(self, coro: Any) -> Any:
        try:
            return await self.plane.call(coro)
        except ActuatorError as exc:
            status = 404 if str(exc).startswith("no worker") else 409
            raise APIError(status, str(exc), code="invalid_worker_operation") from None

    @staticmethod
    def _roles(raw: bytes) -> Any:
        try:
            body = json.loads(raw or b"{}")
            roles = body["roles"]
            if not isinstance(roles, str):
                raise TypeError
            return parse_roles(roles)
        except (ValueError, KeyError, TypeError):
            raise APIError(400, 'Give the roles as {"roles": "e" | "p" | "d" | a mix}.', "roles") from None
