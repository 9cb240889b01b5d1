"""The admin API (`/admin/...`) over HTTP: JSON in and out of `serving/api/admin.py`. What `epd ctl`
calls; behind the API key when keys are configured."""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response

from serving.api.admin import AdminService
from serving.api.errors import APIError
from serving.control.client import ControlClient
from serving.gateway.jsonbody import parse_body
from serving.types import Roles, parse_roles


class AdminAPI:
    def __init__(self, plane: ControlClient) -> None:
        self.ops = AdminService(plane)

    async def workers(self) -> Response:
        return JSONResponse(await self.ops.workers())

    async def decisions(self) -> Response:
        return JSONResponse(await self.ops.decisions())

    async def add(self, raw: bytes) -> Response:
        return JSONResponse(await self.ops.add(self._roles(raw)), status_code=201)

    async def switch(self, name: str, raw: bytes) -> Response:
        return JSONResponse(await self.ops.switch(name, self._roles(raw)))

    async def drain(self, name: str) -> Response:
        return JSONResponse(await self.ops.drain(name))

    async def resume(self, name: str) -> Response:
        return JSONResponse(await self.ops.resume(name))

    async def remove(self, name: str) -> Response:
        await self.ops.remove(name)
        return JSONResponse({"name": name, "removed": True})

    @staticmethod
    def _roles(raw: bytes) -> Roles:
        body = parse_body(raw or b"{}")  # the API's own guards: invalid JSON, nesting, bad Unicode
        try:
            roles = body["roles"]
            if not isinstance(roles, str):
                raise TypeError
            return parse_roles(roles)
        except (ValueError, KeyError, TypeError):
            raise APIError(400, 'Give the roles as {"roles": "e" | "p" | "d" | a mix}.', "roles") from None
