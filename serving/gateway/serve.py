"""The gateway as a Ray Serve ingress. The replica finds the stage workers by name (they are named
Ray actors in the `epd` namespace), builds the pipeline over them, and hosts `GatewayService` behind
its HTTP API: served by the replica itself, or by Serve's HTTP proxy (Serve config, KubeRay)."""

import asyncio
import contextlib
import errno
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from serving.config import ControlConfig, ControllerConfig, GatewayConfig, WorkerConfig
from serving.gateway.errors import APIError, error_response, internal_error

# No `from __future__ import annotations` here: FastAPI must see real annotation objects on the
# routes (as strings, `request` would be taken for a query parameter).
from serving.stages.factory import GATEWAY_RESOURCE, NAMESPACE


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


async def build_service(settings: GatewaySettings) -> Any:
    """The service over the deployment's control actor (started here by the first replica, found by
    every other and by every replica that restarts): this replica mirrors its directory and runs the
    pipeline over it."""
    import os
    import uuid

    import ray

    from serving.control.actor import control_actor
    from serving.control.client import ControlClient
    from serving.gateway.service import GatewayService
    from serving.stages.handles import RayHandle

    def resolve(name: str) -> RayHandle:
        return RayHandle(ray.get_actor(name, namespace=NAMESPACE), name)

    client = ControlClient(
        control_actor(settings),
        settings.control,
        gateway_id=f"{os.getpid()}-{uuid.uuid4().hex[:8]}",
        resolve=resolve,
        forward_requests=settings.controller.mode != "off",
    )
    service = GatewayService(
        settings.gateway, settings.model_dir, settings.model_id, client, settings.max_model_len
    )
    client.on_admission_limit = service.admission.set_limit
    await client.start()  # callbacks first: the first directory may carry a limit or the stop
    return service


async def start_rpc(service: Any, cfg: GatewayConfig) -> Any:
    """The gRPC server over the service's layer, on `cfg.grpc_port` (None: no gRPC)."""
    if cfg.grpc_port is None:
        return None
    from serving.rpc.server import RpcServer

    rpc = RpcServer(service.core, service.admin.ops, cfg.host, cfg.grpc_port)
    await rpc.start()
    return rpc


class ServedBy:
    """Every response names the gateway replica that answered it (`x-epd-gateway`): with several
    replicas behind one port, where a request went is otherwise invisible. Plain ASGI: nothing is
    buffered or copied on the way, a stream's chunks included."""

    def __init__(self, app: Any, gateway: str) -> None:
        self.app, self.header = app, (b"x-epd-gateway", gateway.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, named)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object; unexpected ones as a 500 that says nothing inside."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        named = {404: ("Not found.", "not_found"), 405: ("Method not allowed.", "method_not_allowed")}
        message, code = named.get(exc.status_code, ("The request could not be served.", None))
        return error_response(APIError(exc.status_code, message, code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(APIError(400, "The request is not valid."))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        return error_response(internal_error())


def http_app(service: Any, expose_openapi: bool, on_shutdown: Callable[[], Awaitable[None]]) -> FastAPI:
    """The HTTP API over one replica's service: the routes Serve's proxy hands requests to, or that
    the replica serves itself (`serve_http`). `on_shutdown` runs once admission has stopped and the
    in-flight requests have ended (`POST /admin/shutdown`)."""
    openapi = "/openapi.json" if expose_openapi else None
    app = FastAPI(title="EPD Serve", docs_url=None, redoc_url=None, openapi_url=openapi)
    install_error_handlers(app)
    app.add_middleware(ServedBy, gateway=service.plane.gateway_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.chat_completions(request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await service.completions(request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await service.models(request)

    @app.get("/health")
    async def health() -> Response:
        return await service.health()

    @app.get("/ready")
    async def ready() -> Response:
        return await service.ready()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return await service.metrics_text(request)

    # -- admin: the pool directory and the actuator (`epd ctl`) ------------------------------------

    @app.get("/admin/workers")
    async def admin_workers(request: Request) -> Response:
        service.authorize_admin(request)
        return await service.admin.workers()

    @app.get("/admin/decisions")
    async def admin_decisions(request: Request) -> Response:
        service.authorize_admin(request)
        return await service.admin.decisions()

    @app.post("/admin/workers")
    async def admin_add(request: Request) -> Response:
        service.authorize_admin(request)
        return await service.admin.add(await request.body())

    @app.post("/admin/workers/{name}/switch")
    async def admin_switch(name: str, request: Request) -> Response:
        service.authorize_admin(request)
        return await service.admin.switch(name, await request.body())

    @app.post("/admin/workers/{name}/drain")
    async def admin_drain(name: str, request: Request) -> Response:
        service.authorize_admin(request)
        return await service.admin.drain(name)

    @app.post("/admin/workers/{name}/resume")
    async def admin_resume(name: str, request: Request) -> Response:
        service.authorize_admin(request)
        return await service.admin.resume(name)

    @app.delete("/admin/workers/{name}")
    async def admin_remove(name: str, request: Request) -> Response:
        service.authorize_admin(request)
        return await service.admin.remove(name)

    @app.post("/admin/shutdown")
    async def admin_shutdown(request: Request) -> Response:
        """Stop admitting (503 + Retry-After) and wait for in-flight requests, up to the grace."""
        service.authorize_admin(request)
        answer = await service.begin_shutdown()
        await on_shutdown()
        return answer

    return app


# Serve's proxy keeps idle client connections this long too: a client reusing a pooled connection
# the server has just closed sees the request fail, so idle connections are not cut short.
_KEEP_ALIVE_S = 90


def bind_socket(host: str, port: int, shared: bool = False) -> socket.socket:
    """A TCP socket bound to host:port, as the replica's HTTP server binds it (`epd serve` checks its
    ports the same way before starting Ray); OSError when it cannot be. `shared`: several gateway
    replicas bind it (SO_REUSEPORT: the kernel spreads new connections over them)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT connections
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def bind_http(host: str, port: int, shared: bool = False, wait_s: float = 30.0) -> socket.socket:
    """A socket bound to host:port for the replica's HTTP server. A replica Serve stops gracefully
    (an unhealthy one) can still hold the port while its replacement starts: a taken port is tried
    again for up to `wait_s` before the error is raised."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            return bind_socket(host, port, shared)
        except OSError as e:
            if e.errno != errno.EADDRINUSE or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.5)


async def serve_http(app: FastAPI, sock: socket.socket) -> tuple[Any, asyncio.Task]:
    """Serve `app` on the bound `sock` from this process's running event loop; returns the uvicorn
    server and the task that runs it, once it listens. Through Serve's proxy instead, every SSE chunk
    of every stream crossed two more Ray runtimes, about 0.8 ms of CPU per token (`docs/benchmarks.md`)."""
    import uvicorn

    from serving.gateway.disconnect import CancelOnDisconnect

    config = uvicorn.Config(
        CancelOnDisconnect(app),
        lifespan="off",
        access_log=False,
        log_config=None,
        log_level="warning",  # below that uvicorn logs every ASGI message
        timeout_keep_alive=_KEEP_ALIVE_S,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():  # it failed to start: say why
            task.result()
            raise RuntimeError(f"the HTTP server on {sock.getsockname()} stopped while starting")
        await asyncio.sleep(0.01)
    return server, task


def gateway_application(settings: GatewaySettings) -> Any:
    """The bound Serve application: one ingress deployment that builds the service and its HTTP API
    in the replica. With `GatewayConfig.http_in_replica` the replica also serves that API itself on
    the gateway's host and port (`epd serve` on a local Ray then starts no Serve proxy)."""
    from ray import serve

    options: dict[str, Any] = {"num_cpus": 0.25}
    if settings.role_resources:  # on Kubernetes the head offers `epd-gateway`: the gateway stays there
        options["resources"] = {GATEWAY_RESOURCE: 0.01}

    @serve.deployment(
        name="gateway",
        num_replicas=settings.gateway.replicas,
        max_ongoing_requests=4096,
        ray_actor_options=options,
    )
    @serve.ingress()
    class Gateway:
        async def __init__(self, settings: GatewaySettings) -> None:
            cfg = settings.gateway
            # The port first: a replica that cannot have it fails before it adopts any worker.
            sock = await bind_http(cfg.host, cfg.port, cfg.replicas > 1) if cfg.http_in_replica else None
            self.service = await build_service(settings)
            self.api = http_app(self.service, cfg.expose_openapi, self._stop_rpc)
            # The gRPC API on this replica's event loop, beside the routes: one service layer, so one
            # admission, one set of metrics. Started before the replica reports ready.
            self.rpc = await start_rpc(self.service, cfg)
            # (server, task): the loop holds tasks weakly, the replica keeps this one alive.
            self.http = await serve_http(self.api, sock) if sock is not None else None

        def __serve_build_asgi_app__(self) -> FastAPI:
            return self.api

        def check_health(self) -> None:
            """Serve's periodic check: a replica whose HTTP server has stopped is replaced."""
            if self.http is not None and self.http[1].done():
                raise RuntimeError("the gateway's HTTP server has stopped")

        async def __del__(self) -> None:
            """Serve stops this replica: give up the ports now, so a replacement can bind them. The
            workers stay; the next replica adopts them."""
            if getattr(self, "http", None) is not None:  # None too where __init__ did not get so far
                server, task = self.http
                server.should_exit = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, timeout=5.0)
            await self._stop_rpc()
            if getattr(self, "service", None) is not None:
                await self.service.plane.stop()

        async def _stop_rpc(self) -> None:
            rpc, self.rpc = getattr(self, "rpc", None), None
            if rpc is not None:
                await rpc.stop(grace_s=1.0)  # in-flight calls ended (admin shutdown); refuse new ones

    return Gateway.bind(settings)
