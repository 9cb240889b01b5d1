"""The Admin service: the same control-plane operations as `/admin/*` (`serving/api/admin.py`), and
the gateway's SLO targets and attainment. Needs an API key whenever keys are configured."""

from __future__ import annotations

from typing import Any

import grpc

from serving.api.admin import AdminService
from serving.api.errors import APIError
from serving.api.service import GenerationService
from serving.rpc.proto import admin_pb2 as pb
from serving.rpc.status import abort, bearer
from serving.types import Roles, parse_roles


def worker_message(view: dict[str, Any]) -> pb.Worker:
    return pb.Worker(**{k: v for k, v in view.items() if v is not None})


class AdminServicer:
    def __init__(self, core: GenerationService, ops: AdminService) -> None:
        self.core, self.ops = core, ops

    async def ListWorkers(self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._authorize(context)
        view = await self.ops.workers()
        return pb.ListWorkersResponse(
            version=view["version"],
            ready=view["ready"],
            workers=[worker_message(w) for w in view["workers"]],
            control=pb.ControlPlane(**view["control"]),
        )

    async def SwitchRole(self, request: pb.SwitchRoleRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        roles = await self._roles(request.roles, context)
        return worker_message(await self._act(self.ops.switch(request.name, roles), context))

    async def Drain(self, request: pb.WorkerRef, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._authorize(context)
        return worker_message(await self._act(self.ops.drain(request.name), context))

    async def Resume(self, request: pb.WorkerRef, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._authorize(context)
        return worker_message(await self._act(self.ops.resume(request.name), context))

    async def AddWorker(self, request: pb.AddWorkerRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        roles = await self._roles(request.roles, context)
        return worker_message(await self._act(self.ops.add(roles), context))

    async def RemoveWorker(self, request: pb.WorkerRef, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._authorize(context)
        await self._act(self.ops.remove(request.name), context)
        return pb.RemoveWorkerResponse(name=request.name, removed=True)

    async def GetSLO(self, request: pb.GetSLORequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        await self._authorize(context)
        slo = self.core.slo()
        return pb.SLOStatus(
            ttft_target_s=slo.ttft_target_s,
            tpot_target_s=slo.tpot_target_s,
            requests=slo.requests,
            ttft_met=slo.ttft_met,
            tpot_met=slo.tpot_met,
            met=slo.met,
            attainment=slo.attainment,
            goodput_rps=slo.goodput_rps,
            window_s=slo.window_s,
        )

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self.core.authorize(bearer(context))
        except APIError as exc:
            await abort(context, exc)

    async def _roles(self, text: str, context: grpc.aio.ServicerContext) -> Roles:
        await self._authorize(context)
        try:
            return parse_roles(text)
        except ValueError:
            await abort(context, APIError(400, "Give the roles as e, p, d or a mix such as pd.", "roles"))

    async def _act(self, operation: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await operation
        except APIError as exc:
            await abort(context, exc)
