"""A client that leaves mid-answer (HTTP disconnect, gRPC cancel) ends its request as aborted and frees
its KV on every worker.

On a server of its own whose context is long enough that the answer cannot be over before the client
leaves: the tiny model decodes 2,000 tokens in well under a second, and an SSE answer that short can sit
whole in the socket's buffers, so on the shared 2,048-token server the request finished by itself and
the test proved nothing about leaving."""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import httpx
import pytest

from loadgen.server import free_port, start_server, stop_server
from serving.rpc.proto import generate_pb2 as pb
from serving.rpc.proto import generate_pb2_grpc
from tests.e2e.conftest import API_KEY
from tests.e2e.grpc_client import AUTH, user
from tests.e2e.test_openai_api import MODEL, kv_usage

LONG_ANSWER = 30_000  # tokens: ~10 s of the tiny model's decoding, far past the client's few chunks


@pytest.fixture(scope="module")
def long_server(tiny_model: Path, tmp_path_factory):
    grpc_port = free_port()
    args = ["--model", str(tiny_model), "--api-key", API_KEY, "--max-model-len", "32768",
            "--grpc-port", str(grpc_port)]  # fmt: skip
    proc, url = start_server(args, tmp_path_factory.mktemp("serve-long") / "serve.log", timeout_s=240)
    yield url, grpc_port
    stop_server(proc)


def aborted(server: str) -> float:
    """Requests the gateway ended as aborted (their client left) so far."""
    text = httpx.get(f"{server}/metrics", timeout=30).text
    found = re.search(rf'epd:request_success_total\{{finished_reason="abort",model_name="{MODEL}"\}} (\S+)',
                      text)  # fmt: skip
    return float(found.group(1)) if found else 0.0


def wait_freed_and_aborted(server: str, aborts_before: float) -> None:
    deadline = time.monotonic() + 60
    usage, aborts = kv_usage(server), aborted(server)
    while time.monotonic() < deadline and (any(v > 0 for v in usage.values()) or aborts < aborts_before + 1):
        time.sleep(0.2)
        usage, aborts = kv_usage(server), aborted(server)
    assert usage and all(v == 0 for v in usage.values()), usage
    assert aborts == aborts_before + 1


def test_client_disconnect_aborts_and_frees_kv_everywhere(long_server):
    server, _ = long_server
    before = aborted(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on and on."}],
            "max_tokens": LONG_ANSWER, "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{server}/v1/chat/completions"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, json=body, headers=headers) as response:
        lines = response.iter_lines()
        chunks = [next(lines) for _ in range(12)]
        assert any('"content"' in c for c in chunks)
    # leaving the block closed the connection mid-stream
    wait_freed_and_aborted(server, before)


def test_a_client_that_leaves_a_non_streaming_request_aborts_it_and_frees_kv(long_server):
    """No response has started, so nothing the server writes would notice the closed connection: the
    server must watch for it (uvicorn alone would let the request run to its 30,000 tokens)."""
    server, _ = long_server
    before = aborted(server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on and on."}],
            "max_tokens": LONG_ANSWER, "ignore_eos": True, "temperature": 0}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=3.0)
    wait_freed_and_aborted(server, before)


def test_grpc_cancel_aborts_and_frees_kv_everywhere(long_server):
    server, grpc_port = long_server
    before = aborted(server)
    request = pb.GenerateRequest(
        messages=[user("Go on and on.")],
        sampling=pb.SamplingParams(max_tokens=LONG_ANSWER, temperature=0, ignore_eos=True),
    )
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        call = generate_pb2_grpc.GenerationStub(channel).Generate(request, metadata=AUTH, timeout=120)
        tokens = 0
        for response in call:
            tokens += len(response.token_ids)
            if tokens >= 8:
                break
        assert tokens >= 8
        call.cancel()
        assert call.code() == grpc.StatusCode.CANCELLED
    wait_freed_and_aborted(server, before)
