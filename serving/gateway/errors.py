"""OpenAI error objects. Messages are written for clients: no exception text, paths or addresses."""

from __future__ import annotations

from fastapi.responses import JSONResponse

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


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        stage: str = "gateway",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.stage = stage  # where it came from, for the error metrics: gateway, encode, prefill, decode

    @property
    def error_type(self) -> str:
        """The `error_type` label of `epd:request_errors_total`."""
        if self.code == "stage_failed":
            return "stage_failed"
        named = {401: "authentication", 429: "rate_limited", 503: "unavailable", 504: "timeout"}
        return named.get(self.status, "invalid_request" if self.status < 500 else "internal")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def internal_error() -> APIError:
    return APIError(
        500, "The server had an internal error while processing the request.", code="internal_error"
    )
