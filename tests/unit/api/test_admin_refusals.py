"""The admin operations' answers when the control plane says no or cannot be reached: its refusal's
status (404 unknown worker, 409 its state) as an OpenAI error object, and 503 with Retry-After while
the control actor restarts — never a 500."""

from __future__ import annotations

import asyncio
from unittest.mock import MagicMock

import pytest

from serving.api.admin import AdminService
from serving.api.errors import APIError
from serving.control.client import ControlUnavailable, OperationRefused
from serving.control.records import OpRefused
from serving.types import parse_roles


def admin(error: Exception) -> AdminService:
    plane = MagicMock()

    async def refuse(*_):
        raise error

    plane.drain = plane.add = refuse
    return AdminService(plane)


@pytest.mark.parametrize("status", [404, 409])
def test_a_refusal_keeps_its_status(status):
    with pytest.raises(APIError) as err:
        asyncio.run(admin(OperationRefused(OpRefused(status, "no worker named 'x'"))).drain("x"))
    assert err.value.status == status and err.value.code == "invalid_worker_operation"


def test_an_unreachable_control_plane_is_a_503_with_retry_after():
    with pytest.raises(APIError) as err:
        asyncio.run(admin(ControlUnavailable("restarting")).add(parse_roles("d")))
    assert err.value.status == 503 and err.value.headers == {"Retry-After": "2"}
