"""The service layer's one error type. `status` is an HTTP status number used as the error's kind (the
OpenAI routes answer with it; `serving/rpc/status.py` maps it to a gRPC code). Messages are written for
clients: no exception text, paths or addresses."""

from __future__ import annotations

from serving.types import NoWorkerAvailable


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


def internal_error() -> APIError:
    return APIError(
        500, "The server had an internal error while processing the request.", code="internal_error"
    )


def timed_out() -> APIError:
    return APIError(504, "The request timed out.", code="timeout")


def unavailable(exc: NoWorkerAvailable) -> APIError:
    """No worker could take a stage in time: 503, with when to retry."""
    stage = exc.stage.name.lower()
    message = f"The server has no {stage} capacity right now; retry shortly."
    return APIError(503, message, code="no_worker_available", headers={"Retry-After": "5"}, stage=stage)


def invalid_value(param: str, message: str) -> APIError:
    return APIError(400, f"Invalid value for '{param}': {message}.", param, "invalid_value")
