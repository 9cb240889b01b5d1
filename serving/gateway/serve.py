"""The gateway as a Ray Serve ingress. The replica finds the stage workers by name (they are named
Ray actors in the `epd` namespace), builds the pipeline over them, and hosts `GatewayService`."""

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from serving.config import ControlConfig, ControllerConfig, GatewayConfig, WorkerConfig
from serving.gateway.errors import APIError, error_response, internal_error
from serving.types import Roles

# No `from __future__ import annotations` here: FastAPI must see real annotation objects on the
# route methods, and inside a Serve replica string annotations do not resolve (`request` would be
# taken for a query parameter).

NAMESPACE = "epd"
GATEWAY_RESOURCE = "epd-gateway"


@dataclass(frozen=True)
class GatewaySettings:
    """What a gateway replica needs to find the workers and to start new ones."""

    gateway: GatewayConfig
    control: ControlConfig
    worker_template: WorkerConfig  # engine and limits of every worker it starts (adds, replacements)
    model_dir: str
    model_id: str
    topology: str
    workers: tuple[tuple[str, tuple[int, ...]], ...]  # (actor name, pinned CPUs) of the first workers
    cluster_id: str
    max_model_len: int
    gpus_per_worker: int = 0
    role_resources: bool = False  # workers ask for their group's `epd-<roles>` resource (Kubernetes)
    controller: ControllerConfig = ControllerConfig()


def build_service(settings: GatewaySettings) -> Any:
    """The service over a control plane that adopts the workers `epd serve` started."""
    import ray

    from serving.control.plane import ControlPlane
    from serving.gateway.service import GatewayService
    from serving.stages.factory import RayWorkerFactory, worker_name
    from serving.stages.handles import RayHandle

    factory = RayWorkerFactory(
        settings.worker_template, NAMESPACE, settings.gpus_per_worker, settings.role_resources
    )

    def name_for(roles: Roles, index: int) -> str:
        return worker_name(roles, index, settings.cluster_id)

    plane = ControlPlane(factory, settings.control, name_for, len(settings.workers))
    handles = [RayHandle(ray.get_actor(name, namespace=NAMESPACE), name) for name, _ in settings.workers]
    plane.adopt(handles, dict(settings.workers))
    service = GatewayService(
        settings.gateway, settings.model_dir, settings.model_id, plane, settings.max_model_len
    )
    if settings.controller.mode != "off":
        from serving.controller.build import build_controller

        plane.start_controller(build_controller(settings, plane, service.metrics, service.admission))
    return service


async def start_rpc(service: Any, cfg: GatewayConfig) -> Any:
    """The gRPC server over the service's layer, on `cfg.grpc_port` (None: no gRPC)."""
    if cfg.grpc_port is None:
        return None
    from serving.rpc.server import RpcServer

    rpc = RpcServer(service.core, service.admin.ops, cfg.host, cfg.grpc_port)
    await rpc.start()
    return rpc


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object; unexpected ones as a 500 that says nothing inside."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        message = "Not found." if exc.status_code == 404 else "The request could not be served."
        return error_response(APIError(exc.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(APIError(400, "The request is not valid."))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        return error_response(internal_error())


def gateway_application(settings: GatewaySettings) -> Any:
    """The bound Serve application: one ingress deployment whose routes call the service."""
    from ray import serve

    app = FastAPI(
        title="EPD Serve",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.gateway.expose_openapi else None,
    )
    install_error_handlers(app)

    options: dict[str, Any] = {"num_cpus": 0.25}
    if settings.role_resources:  # on Kubernetes the head offers `epd-gateway`: the gateway stays there
        options["resources"] = {GATEWAY_RESOURCE: 0.01}

    @serve.deployment(name="gateway", max_ongoing_requests=4096, ray_actor_options=options)
    @serve.ingress(app)
    class Gateway:
        async def __init__(self, settings: GatewaySettings) -> None:
            self.service = build_service(settings)
            # The gRPC API on this replica's event loop, beside the routes: one service layer, so one
            # admission, one set of metrics. Started before the replica reports ready.
            self.rpc = await start_rpc(self.service, settings.gateway)

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

        # -- admin: the pool directory and the actuator (`epd ctl`) --------------------------------

        @app.get("/admin/workers")
        async def admin_workers(self, request: Request) -> Response:
            self.service.authorize_admin(request)
            return self.service.admin.workers()

        @app.get("/admin/decisions")
        async def admin_decisions(self, request: Request) -> Response:
            self.service.authorize_admin(request)
            return self.service.admin.decisions()

        @app.post("/admin/workers")
        async def admin_add(self, request: Request) -> Response:
            self.service.authorize_admin(request)
            return await self.service.admin.add(await request.body())

        @app.post("/admin/workers/{name}/switch")
        async def admin_switch(self, name: str, request: Request) -> Response:
            self.service.authorize_admin(request)
            return await self.service.admin.switch(name, await request.body())

        @app.post("/admin/workers/{name}/drain")
        async def admin_drain(self, name: str, request: Request) -> Response:
            self.service.authorize_admin(request)
            return await self.service.admin.drain(name)

        @app.post("/admin/workers/{name}/resume")
        async def admin_resume(self, name: str, request: Request) -> Response:
            self.service.authorize_admin(request)
            return await self.service.admin.resume(name)

        @app.delete("/admin/workers/{name}")
        async def admin_remove(self, name: str, request: Request) -> Response:
            self.service.authorize_admin(request)
            return await self.service.admin.remove(name)

        @app.post("/admin/shutdown")
        async def admin_shutdown(self, request: Request) -> Response:
            """Stop admitting (503 + Retry-After) and wait for in-flight requests, up to the grace."""
            self.service.authorize_admin(request)
            answer = await self.service.begin_shutdown()
            if self.rpc is not None:
                await self.rpc.stop(grace_s=1.0)  # in-flight calls ended above; refuse new ones
            return answer

    return Gateway.bind(settings)
