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


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),  # past the JSON nesting the API allows
        (b'{"roles": "d"' + b"\xff}", "invalid_json"),  # not UTF-8
        (b"[]", None),
        (b'{"roles": 3}', None),
        (b'{"roles": "x"}', None),
    ],
)
def test_a_bad_roles_body_is_a_400_with_the_apis_json_guards(body, code):
    """The body of a worker add or switch goes through the same parser as every request body: nesting
    that would exhaust the interpreter's recursion (a 500 once) is a 400, as is anything that is not
    {"roles": "<roles>"}."""
    from serving.gateway.admin import AdminAPI

    with pytest.raises(APIError) as err:
        AdminAPI._roles(body)
    assert err.value.status == 400
    assert err.value.code == code if code else err.value.param == "roles"
