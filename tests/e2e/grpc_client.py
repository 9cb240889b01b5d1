"""Helpers of the gRPC end-to-end tests: a channel to the session server and request builders."""

from __future__ import annotations

from collections import defaultdict

import grpc

from serving.rpc.proto import generate_pb2 as pb
from tests.e2e.conftest import API_KEY

AUTH = (("authorization", f"Bearer {API_KEY}"),)


def user(*parts: pb.ContentPart | str) -> pb.Message:
    """A user message from strings (text parts) and image parts; one string alone is plain text."""
    if len(parts) == 1 and isinstance(parts[0], str):
        return pb.Message(role="user", text=parts[0])
    return pb.Message(role="user", parts=[pb.ContentPart(text=p) if isinstance(p, str) else p for p in parts])


def image_bytes(data: bytes) -> pb.ContentPart:
    return pb.ContentPart(image=pb.Image(data=data))


def image_url(url: str) -> pb.ContentPart:
    return pb.ContentPart(image=pb.Image(url=url))


def generate(channel: grpc.Channel, request: pb.GenerateRequest, timeout: float = 120) -> list:
    from serving.rpc.proto import generate_pb2_grpc

    return list(generate_pb2_grpc.GenerationStub(channel).Generate(request, metadata=AUTH, timeout=timeout))


def by_choice(responses: list[pb.GenerateResponse]) -> dict[int, list[pb.GenerateResponse]]:
    out: dict[int, list[pb.GenerateResponse]] = defaultdict(list)
    for r in responses:
        out[r.index].append(r)
    return dict(out)
