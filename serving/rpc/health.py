"""`grpc.health.v1` per role: `epd.encode`, `epd.prefill` and `epd.decode` are SERVING while some
worker takes that role's work; the overall service ("") and `epd.v1.Generation` while every role is
served; `epd.v1.Admin` while the gateway runs. Everything is NOT_SERVING once shutdown began.
`Check` reads the live directory; `Watch` sees changes within `interval_s`."""

from __future__ import annotations

import asyncio
import contextlib

from grpc_health.v1 import health, health_pb2

from serving.api.service import GenerationService
from serving.types import Role

ROLE_SERVICES = {Role.ENCODE: "epd.encode", Role.PREFILL: "epd.prefill", Role.DECODE: "epd.decode"}
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class RoleHealth(health.aio.HealthServicer):
    def __init__(self, core: GenerationService, interval_s: float = 1.0) -> None:
        super().__init__()
        self.core, self.interval_s = core, interval_s
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        up = not self.core.shutting_down
        ready = self.core.roles_ready()
        for role, name in ROLE_SERVICES.items():
            await self.set(name, SERVING if up and ready.get(role) else NOT_SERVING)
        everything = SERVING if up and all(ready.get(role) for role in Role) else NOT_SERVING
        await self.set("", everything)
        await self.set("epd.v1.Generation", everything)
        await self.set("epd.v1.Admin", SERVING if up else NOT_SERVING)

    async def Check(self, request, context):  # noqa: N802 - gRPC's method name
        await self.refresh()
        return await super().Check(request, context)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.enter_graceful_shutdown()

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a failed read is retried next tick
                await self.refresh()
            await asyncio.sleep(self.interval_s)
