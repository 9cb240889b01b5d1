"""Bad input over gRPC gets the right status code and a message that names the problem and leaks
nothing (no exception text, paths or addresses), is counted in the error metrics like HTTP's, and
the server keeps serving: after the whole table a good request still succeeds."""

from __future__ import annotations

import re

import grpc
import httpx
import pytest

from serving.rpc.proto import generate_pb2 as pb
from serving.rpc.proto import generate_pb2_grpc
from tests.e2e.conftest import png_bytes
from tests.e2e.grpc_client import AUTH, generate, image_bytes, image_url, user
from tests.e2e.test_bad_inputs import animated_gif, bomb_png

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
TEXT = [user("hi")]


def request(messages=TEXT, prompt: str = "", n: int | None = None, **sampling) -> pb.GenerateRequest:
    out = pb.GenerateRequest(messages=messages, prompt=prompt, sampling=pb.SamplingParams(**sampling))
    if n is not None:
        out.n = n
    return out


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def with_unknown_field(message: pb.GenerateRequest, number: int) -> bytes:
    """The message's bytes plus a varint field the server's .proto does not declare."""
    return message.SerializeToString() + varint(number << 3) + b"\x01"


def with_unknown_in_sampling() -> bytes:
    """A request whose `sampling` (field 4) carries a field number the server does not declare."""
    sampling = pb.SamplingParams(max_tokens=2).SerializeToString() + varint(42 << 3) + b"\x01"
    return (
        pb.GenerateRequest(messages=TEXT).SerializeToString() + bytes([4 << 3 | 2, len(sampling)]) + sampling
    )


def invalid_utf8_prompt() -> bytes:
    raw = b"\xff\xfe"
    return bytes([3 << 3 | 2, len(raw)]) + raw  # field 3 (prompt), length-delimited


CASES = [
    # (name, request or raw bytes, expected code, a word the message must hold)
    ("neither messages nor prompt", request(messages=[]), INVALID, "messages"),
    ("messages and prompt", request(prompt="x"), INVALID, "prompt"),
    ("unknown role", request(messages=[pb.Message(role="robot", text="x")]), INVALID, "role"),
    ("text and parts at once", request(messages=[pb.Message(role="user", text="x", parts=[pb.ContentPart(text="y")])]), INVALID, "messages.0"),
    ("empty part", request(messages=[pb.Message(role="user", parts=[pb.ContentPart()])]), INVALID, "part"),
    ("image without a source", request(messages=[user(pb.ContentPart(image=pb.Image()), "x")]), INVALID, "image"),
    ("temperature 7", request(temperature=7), INVALID, "temperature"),
    ("temperature NaN", request(temperature=float("nan")), INVALID, "temperature"),
    ("top_p 0", request(top_p=0), INVALID, "top_p"),
    ("top_k -2", request(top_k=-2), INVALID, "top_k"),
    ("n 0", request(n=0), INVALID, "'n'"),
    ("n 17", request(n=17), INVALID, "'n'"),
    ("seed beyond int64", request(seed=2**64 - 1), INVALID, "seed"),
    ("max_tokens 0", request(max_tokens=0), INVALID, "max_tokens"),
    ("max_tokens 2**31", request(max_tokens=2**31), INVALID, "max_tokens"),
    ("min_tokens above max_tokens", request(max_tokens=2, min_tokens=10), INVALID, "min_tokens"),
    ("context too long", request(max_tokens=10**6), INVALID, "context length"),
    ("17 stop strings", request(stop=[f"s{i}" for i in range(17)]), INVALID, "stop"),
    ("empty stop string", request(stop=[""]), INVALID, "stop"),
    ("stop string of 1025 chars", request(stop=["x" * 1025]), INVALID, "stop"),
    ("logprobs 21", request(logprobs=21), INVALID, "logprobs"),
    ("unknown model", pb.GenerateRequest(model="gpt-17", messages=TEXT), NOT_FOUND, "gpt-17"),
    ("image bytes that are text", request(messages=[user(image_bytes(b"hello, I am text"), "x")]), INVALID, "decoded"),
    ("decompression bomb", request(messages=[user(image_bytes(bomb_png()), "x")]), INVALID, "pixels"),
    ("gif of 300 frames", request(messages=[user(image_bytes(animated_gif(300)), "x")]), INVALID, "frames"),
    ("nine images", request(messages=[user(*[image_bytes(png_bytes(28, 28))] * 9, "x")]), INVALID, "images"),
    ("file url", request(messages=[user(image_url("file:///etc/passwd"), "x")]), INVALID, "URL"),
    ("metadata address", request(messages=[user(image_url("http://169.254.169.254/latest"), "x")]), INVALID, "address"),
    ("bad data url", request(messages=[user(image_url("data:image/png;base64,@@@"), "x")]), INVALID, "base64"),
    ("unknown top-level field", with_unknown_field(request(), 99), INVALID, "99"),
    ("unknown field inside sampling", with_unknown_in_sampling(), INVALID, "sampling"),
    ("invalid utf-8 in a string", invalid_utf8_prompt(), INVALID, "protobuf"),
    ("not a protobuf message", b"\xff\xff\xff\xff", INVALID, "protobuf"),
    ("message over the size limit", request(messages=[user(image_bytes(b"\0" * (3 * 2**20)), "x")]), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]  # fmt: skip
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/work|0x[0-9a-f]{6,}|Exception|Error\b|serving\.", re.I)


def raw_generate(channel: grpc.Channel, payload: bytes | pb.GenerateRequest, metadata=AUTH) -> list:
    method = channel.unary_stream(
        "/epd.v1.Generation/Generate",
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=pb.GenerateResponse.FromString,
    )
    return list(method(payload, metadata=metadata, timeout=60))


@pytest.fixture(scope="module")
def channel(server, grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        yield ch


def invalid_requests(server: str) -> float:
    text = httpx.get(f"{server}/metrics", timeout=30).text
    found = re.search(r'epd:request_errors_total\{error_type="invalid_request",model_name="epd-tiny",stage="gateway"\} (\S+)', text)  # fmt: skip
    return float(found.group(1)) if found else 0.0


def test_bad_input_gets_the_right_status_and_a_clean_message(server, channel):
    cases = CASES
    before = invalid_requests(server)
    for name, payload, code, word in cases:
        with pytest.raises(grpc.RpcError) as err:
            raw_generate(channel, payload)
        details = err.value.details() or ""
        assert err.value.code() == code, (name, err.value.code(), details)
        assert word.lower() in details.lower(), (name, details)
        assert not LEAKS.search(details), (name, details)
    counted = sum(code in (INVALID, NOT_FOUND) for _, _, code, _ in cases)
    assert invalid_requests(server) - before == counted  # gRPC refusals are counted as HTTP's are
    good = generate(channel, request(max_tokens=3, temperature=0))
    assert good[-1].finish_reason == pb.FINISH_REASON_LENGTH and good[-1].usage.completion_tokens == 3


def test_the_table_covers_the_codes_and_at_least_fifteen_cases():
    assert len(CASES) >= 15
    assert {code for _, _, code, _ in CASES} >= {INVALID, NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_missing_or_wrong_key_is_unauthenticated_on_both_methods(channel):
    stub = generate_pb2_grpc.GenerationStub(channel)
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "nope"),)):
        with pytest.raises(grpc.RpcError) as err:
            raw_generate(channel, request(), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.Tokenize(pb.TokenizeRequest(prompt="x"), metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
