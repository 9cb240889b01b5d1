"""Service errors as gRPC statuses. The message is the service's (written for clients, nothing
internal); the code follows the error's kind."""

from __future__ import annotations

from typing import NoReturn

import grpc

from serving.api.errors import APIError

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # the request's own images are too large: bad input
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,  # its images could not be fetched or are not images
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(exc: APIError) -> grpc.StatusCode:
    return _CODES.get(
        exc.status, grpc.StatusCode.INTERNAL if exc.status >= 500 else grpc.StatusCode.INVALID_ARGUMENT
    )


async def abort(context: grpc.aio.ServicerContext, exc: APIError) -> NoReturn:
    """End the call with the error's status; `retry-after` travels as trailing metadata."""
    if exc.headers and (retry := exc.headers.get("Retry-After")):
        context.set_trailing_metadata((("retry-after", retry),))
    await context.abort(status_code(exc), exc.message)
    raise AssertionError("unreachable: abort raises")


def bearer(context: grpc.aio.ServicerContext) -> str | None:
    """The `authorization` metadata value, as the HTTP header would carry it."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None
