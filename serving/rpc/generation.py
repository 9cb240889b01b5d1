"""The Generation service: `Generate` (server streaming) and `Tokenize`, as a thin adapter over the
service layer. Authentication comes from the `authorization` metadata; the call's deadline bounds the
request (with the server's own request timeout); a client that cancels, or whose deadline passes,
ends the request on every worker it touched (the same cleanup as an HTTP client that disconnects)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from serving.api.errors import APIError, internal_error
from serving.api.run import Generation, failed_stage
from serving.api.service import GenerationService
from serving.rpc.convert import generate_request, generate_response
from serving.rpc.proto import generate_pb2 as pb
from serving.rpc.status import abort, bearer
from serving.types import FinishReason

log = logging.getLogger(__name__)


class GenerationServicer:
    def __init__(self, core: GenerationService) -> None:
        self.core = core

    async def Generate(  # noqa: N802 - gRPC's method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.perf_counter()
        try:
            with self.core.errors_counted():
                self.core.authorize(bearer(context))
                typed = generate_request(request)
                generation = await self.core.generate(
                    typed, arrival, "gen", timeout_s=context.time_remaining()
                )
        except APIError as exc:
            await abort(context, exc)
        except Exception:  # noqa: BLE001 - counted above; the client gets a status that says nothing inside
            log.exception("Generate failed before its stream began")
            await abort(context, internal_error())
        parse_calls = bool(typed.tools) and typed.tool_choice.mode != "none"
        async for response in self._stream(generation, context, parse_calls):
            yield response

    async def _stream(
        self, generation: Generation, context: grpc.aio.ServicerContext, parse_calls: bool
    ) -> AsyncIterator[pb.GenerateResponse]:
        metrics, finished = self.core.metrics, 0
        try:
            async for choice, delta in generation.events():
                if delta.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                    if delta.finish_reason == FinishReason.ERROR:
                        metrics.observe_error("stage_failed", failed_stage(delta))
                    message = f"The request failed: {delta.error or 'aborted'}."
                    await abort(context, APIError(500, message, code="stage_failed"))
                finished += delta.finished
                if not (delta.token_ids or delta.text or delta.finished):
                    continue
                last = delta.finished and finished == len(generation.choices)
                usage = self.core.usage(generation.choices) if last else None
                yield generate_response(generation.request_id, choice, delta, usage, parse_calls)
        except APIError as exc:  # a timeout, or no worker for a later choice
            metrics.observe_error(exc.error_type, exc.stage)
            await abort(context, exc)
        except asyncio.CancelledError:
            # The client cancelled, or its deadline passed (gRPC cancels the handler for both); the
            # latter is a timeout in the metrics, as the server's own request timeout is.
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                metrics.observe_error("timeout", "gateway")
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:  # noqa: BLE001 - after the stream began an error can only be a status
            log.exception("Generate failed while streaming")
            metrics.observe_error("internal", "gateway")
            await abort(context, internal_error())
        finally:
            await generation.close()

    async def Tokenize(  # noqa: N802 - gRPC's method name
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        try:
            with self.core.errors_counted():
                self.core.authorize(bearer(context))
                result = await self.core.tokenize(generate_request(request))
        except APIError as exc:
            await abort(context, exc)
        except Exception:  # noqa: BLE001 - counted above
            log.exception("Tokenize failed")
            await abort(context, internal_error())
        return pb.TokenizeResponse(
            token_ids=result.token_ids,
            image_tokens=result.image_tokens,
            max_model_len=self.core.max_model_len,
        )
