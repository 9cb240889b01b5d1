"""The gRPC server of a gateway: Generation, Admin, health per role and reflection, on the event loop
of the process that hosts the HTTP routes (the Ray Serve replica), so both front ends share one
service layer: one admission, one set of metrics."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.api.admin import AdminService
from serving.api.service import GenerationService
from serving.rpc.admin import AdminServicer
from serving.rpc.convert import lenient
from serving.rpc.generation import GenerationServicer
from serving.rpc.health import RoleHealth
from serving.rpc.proto import admin_pb2, generate_pb2

GENERATION = generate_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


def _generation_handlers(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
    # Built here rather than with the generated add_*_to_server: requests that do not parse become
    # INVALID_ARGUMENT (`lenient`) instead of gRPC's INTERNAL.
    return grpc.method_handlers_generic_handler(
        GENERATION,
        {
            "Generate": grpc.unary_stream_rpc_method_handler(
                servicer.Generate,
                request_deserializer=lenient(generate_pb2.GenerateRequest),
                response_serializer=generate_pb2.GenerateResponse.SerializeToString,
            ),
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                servicer.Tokenize,
                request_deserializer=lenient(generate_pb2.TokenizeRequest),
                response_serializer=generate_pb2.TokenizeResponse.SerializeToString,
            ),
        },
    )


def _admin_handlers(servicer: AdminServicer) -> grpc.GenericRpcHandler:
    methods = admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods
    return grpc.method_handlers_generic_handler(
        ADMIN,
        {
            m.name: grpc.unary_unary_rpc_method_handler(
                getattr(servicer, m.name),
                request_deserializer=lenient(getattr(admin_pb2, m.input_type.name)),
                response_serializer=getattr(admin_pb2, m.output_type.name).SerializeToString,
            )
            for m in methods
        },
    )


class RpcServer:
    """Start with `await start()` on the event loop that serves requests; `await stop(grace)`."""

    def __init__(self, core: GenerationService, admin: AdminService, host: str, port: int) -> None:
        self.core, self.address = core, f"{host}:{port}"
        limit = core.cfg.max_body_bytes  # the same cap as an HTTP body (inline images make it large)
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                # Several gateway replicas share the port (the kernel spreads connections); one alone
                # must fail on a taken port instead.
                ("grpc.so_reuseport", 1 if core.cfg.replicas > 1 else 0),
            ]
        )
        self.health = RoleHealth(core)
        self.server.add_generic_rpc_handlers(
            (_generation_handlers(GenerationServicer(core)), _admin_handlers(AdminServicer(core, admin)))
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        services = (GENERATION, ADMIN, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_insecure_port(self.address)

    async def start(self) -> None:
        await self.health.refresh()
        self.health.start()
        await self.server.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.stop()
        await self.server.stop(grace_s)
