"""Service errors as OpenAI error objects (messages are written for clients: nothing internal)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from serving.api.errors import APIError, internal_error

__all__ = ["APIError", "error_body", "error_response", "internal_error"]

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(exc: APIError) -> dict:
    return {
        "error": {
            "message": exc.message,
            "type": TYPES.get(exc.status, "invalid_request_error"),
            "param": exc.param,
            "code": exc.code,
        }
    }


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)
