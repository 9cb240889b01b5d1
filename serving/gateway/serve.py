"""The gateway as a Ray Serve ingress. The replica finds the stage workers by name (they are named
Ray actors in the `epd` namespace), builds the pipeline over them, and hosts `GatewayService`."""

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from serving.config import GatewayConfig
from serving.gateway.errors import APIError, internal_error

# No `from __future__ import annotations` here: FastAPI must see real annotation objects on the
# route methods, and inside a Serve replica string annotations do not resolve (`request` would be
# taken for a query parameter).

NAMESPACE = "epd"


@dataclass(frozen=True)
class GatewaySettings:
    """What a gateway replica needs to find everything else."""

    gateway: GatewayConfig
    model_dir: str
    model_id: str
    topology: str
    workers: tuple[tuple[str, str], ...]  # (actor name, roles)
    max_model_len: int


def build_service(settings: GatewaySettings) -> Any:
    import ray

    from serving.gateway.service import GatewayService
    from serving.pipeline import TOPOLOGIES, Pipeline
    from serving.stages.handles import Pool, RayHandle

    handles = [
        RayHandle(ray.get_actor(name, namespace=NAMESPACE), name, roles) for name, roles in settings.workers
    ]
    pools = {
        roles: Pool(roles, [h for h in handles if h.roles == roles])
        for roles in TOPOLOGIES[settings.topology]
    }
    pipeline = Pipeline(settings.topology, pools)
    return GatewayService(
        settings.gateway, settings.model_dir, settings.model_id, pipeline, handles, settings.max_model_len
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object; unexpected ones as a 500 that says nothing inside."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        message = "Not found." if exc.status_code == 404 else "The request could not be served."
        return APIError(exc.status_code, message).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return APIError(400, "The request is not valid.").response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        return internal_error().response()


def gateway_application(settings: GatewaySettings) -> Any:
    """The bound Serve application: one ingress deployment whose routes call the service."""
    from ray import serve

    app = FastAPI(title="EPD Serve", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    @serve.deployment(name="gateway", max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(app)
    class Gateway:
        def __init__(self, settings: GatewaySettings) -> None:
            self.service = build_service(settings)

        @app.post("/v1/chat/completions")
        async def chat_completions(self, request: Request) -> Response:
            return await self.service.chat_completions(request)

        @app.post("/v1/completions")
        async def completions(self, request: Request) -> Response:
            return await self.service.completions(request)

        @app.get("/v1/models")
        async def models(self, request: Request) -> Response:
            return await self.service.models(request)

        @app.get("/health")
        async def health(self) -> Response:
            return await self.service.health()

        @app.get("/ready")
        async def ready(self) -> Response:
            return await self.service.ready()

        @app.get("/metrics")
        async def metrics(self, request: Request) -> Response:
            return await self.service.metrics_text(request)

    return Gateway.bind(settings)
