"""The gRPC adapter over the service layer with a fake pipeline (no Ray), on a real gRPC server on
127.0.0.1: each refusal reaches the client as its status code (RESOURCE_EXHAUSTED and UNAVAILABLE with
`retry-after`), a server-side timeout is DEADLINE_EXCEEDED, a stage failure mid-stream is INTERNAL
without internals, and a client's cancel cancels every choice."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.api.admin import AdminService
from serving.rpc.proto import generate_pb2 as pb
from serving.rpc.proto import generate_pb2_grpc
from serving.rpc.server import RpcServer
from serving.types import FinishReason, Role, TokenDelta
from tests.unit.api.test_service import FakePipeline, service

REQUEST = pb.GenerateRequest(messages=[pb.Message(role="user", text="hi")], n=2)


class FailingPipeline(FakePipeline):
    async def run(self, request):
        yield TokenDelta(request.request_id, [1], "a")
        failed = dict(error="the prefill stage failed", failed_stage=Role.PREFILL)  # as the pipeline types it
        yield TokenDelta(request.request_id, [], "", FinishReason.ERROR, **failed)


@contextlib.asynccontextmanager
async def serving(tiny_model, pipeline: FakePipeline, **cfg):
    svc = service(tiny_model, pipeline, **cfg)
    rpc = RpcServer(svc, AdminService(svc.plane), "127.0.0.1", 0)
    await rpc.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{rpc.port}") as channel:
            yield svc, generate_pb2_grpc.GenerationStub(channel), channel
    finally:
        await rpc.stop(0)


async def failure(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await call.read() is not grpc.aio.EOF:
            pass
    return err.value


def test_admission_refusal_is_resource_exhausted_with_retry_after(tiny_model):
    async def scenario():
        async with serving(tiny_model, FakePipeline(tokens=3, hang=True), max_concurrent_requests=1,
                           max_queued_requests=0) as (svc, stub, _):  # fmt: skip
            holding = stub.Generate(REQUEST)
            await holding.read()  # admitted and streaming
            err = await failure(stub.Generate(REQUEST))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in err.details()
            assert ("retry-after", "1") in tuple(err.trailing_metadata())
            holding.cancel()

    asyncio.run(scenario())


def test_no_worker_is_unavailable_with_retry_after(tiny_model):
    async def scenario():
        async with serving(tiny_model, FakePipeline(unavailable=True)) as (_, stub, _):
            err = await failure(stub.Generate(REQUEST))
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "encode" in err.details()
            assert ("retry-after", "5") in tuple(err.trailing_metadata())

    asyncio.run(scenario())


def test_the_servers_own_timeout_is_deadline_exceeded(tiny_model):
    async def scenario():
        async with serving(tiny_model, FakePipeline(tokens=3, hang=True), request_timeout_s=0.3) as (
            svc,
            stub,
            _,
        ):
            err = await failure(stub.Generate(REQUEST))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert svc.pipeline.cancelled == 2 and svc.admission.running == 0

    asyncio.run(scenario())


def test_a_stage_failure_mid_stream_is_internal_and_counted(tiny_model):
    async def scenario():
        async with serving(tiny_model, FailingPipeline()) as (svc, stub, _):
            call = stub.Generate(REQUEST)
            first = await call.read()
            assert list(first.token_ids) == [1]
            err = await failure(call)
            assert err.code() == grpc.StatusCode.INTERNAL
            assert err.details() == "The request failed: the prefill stage failed."
            labels = {"model_name": "m", "error_type": "stage_failed", "stage": "prefill"}
            assert svc.metrics.registry.get_sample_value("epd:request_errors_total", labels) >= 1

    asyncio.run(scenario())


def test_client_cancel_cancels_every_choice(tiny_model):
    async def scenario():
        async with serving(tiny_model, FakePipeline(tokens=3, hang=True)) as (svc, stub, _):
            call = stub.Generate(REQUEST)
            await call.read()
            call.cancel()
            for _ in range(100):  # the server learns of the cancel asynchronously
                if svc.pipeline.cancelled == 2:
                    break
                await asyncio.sleep(0.05)
            assert svc.pipeline.cancelled == 2 and svc.admission.running == 0

    asyncio.run(scenario())


def test_health_follows_the_roles_the_directory_serves(tiny_model):
    async def scenario():
        async with serving(tiny_model, FakePipeline()) as (svc, _, channel):
            health = health_pb2_grpc.HealthStub(channel)

            async def status(name: str) -> int:
                return (await health.Check(health_pb2.HealthCheckRequest(service=name))).status

            serving_, not_serving = (
                health_pb2.HealthCheckResponse.SERVING,
                health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            assert await status("") == serving_ and await status("epd.prefill") == serving_
            svc.plane.ready.return_value = {Role.ENCODE: True, Role.PREFILL: False, Role.DECODE: True}
            assert await status("epd.prefill") == not_serving and await status("") == not_serving
            assert await status("epd.encode") == serving_ and await status("epd.v1.Admin") == serving_
            svc.shutting_down = True
            assert await status("epd.encode") == not_serving and await status("epd.v1.Admin") == not_serving

    asyncio.run(scenario())
