"""The gRPC API of a live `epd serve --grpc-port` (the session server, which serves HTTP too): the same
requests give the same tokens over gRPC and HTTP (greedy and seeded, images as bytes and as data
URLs); the stream's order, timings and usage; Tokenize; cancellation and deadline expiry free KV on
every worker; health per role and reflection; the Admin service against `/admin/workers`."""

from __future__ import annotations

import time

import grpc
import httpx
import numpy as np
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.rpc.proto import admin_pb2, admin_pb2_grpc, generate_pb2_grpc
from serving.rpc.proto import generate_pb2 as pb
from serving.types import SamplingParams
from tests.conftest import make_image
from tests.e2e.conftest import API_KEY, png_bytes
from tests.e2e.grpc_client import AUTH, by_choice, generate, image_bytes, image_url, user
from tests.e2e.test_openai_api import MODEL, data_url, kv_usage

HTTP_AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def channel(server, grpc_port):
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


SAMPLINGS = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 0.8, "seed": 1234}}


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=list(SAMPLINGS))
@pytest.mark.parametrize("image_as", ["bytes", "data-url"])
def test_same_request_same_tokens_over_grpc_and_http(channel, client, engine, sampling, image_as):
    png = png_bytes(56, 84, seed=2)
    kw = SAMPLINGS[sampling]
    part = image_bytes(png) if image_as == "bytes" else image_url(data_url(png))
    request = pb.GenerateRequest(
        messages=[user(part, "What do you see?")],
        sampling=pb.SamplingParams(max_tokens=10, ignore_eos=True, **kw),
        n=2,
    )
    choices = by_choice(generate(channel, request))
    content = [
        {"type": "image_url", "image_url": {"url": data_url(png)}},
        {"type": "text", "text": "What do you see?"},
    ]
    http = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=10, n=2,
        extra_body={"ignore_eos": True}, **kw,
    )  # fmt: skip
    prompt = engine.inputs.from_user_prompt("What do you see?", [make_image(56, 84, seed=2)])
    for index in (0, 1):
        seed = kw.get("seed") and kw["seed"] + index
        params = SamplingParams(max_tokens=10, ignore_eos=True, temperature=kw["temperature"], seed=seed)
        want = engine.generate([(prompt, params)])[0]
        messages = choices[index]
        assert [t for m in messages for t in m.token_ids] == want.token_ids, (sampling, index)
        assert "".join(m.text for m in messages) == http.choices[index].message.content == want.text
    usage = [m for ms in choices.values() for m in ms if m.HasField("usage")]
    assert len(usage) == 1
    assert usage[0].usage.prompt_tokens == http.usage.prompt_tokens == len(prompt.token_ids)
    assert usage[0].usage.completion_tokens == http.usage.completion_tokens == 20
    details = http.usage.prompt_tokens_details
    http_image_tokens = getattr(details, "image_tokens", None) or details.model_extra.get("image_tokens")
    assert usage[0].usage.image_tokens == http_image_tokens > 0


def test_stream_order_timings_and_usage(channel):
    request = pb.GenerateRequest(
        messages=[user(image_bytes(png_bytes(40, 40, seed=4)), "Describe it.")],
        sampling=pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        n=3,
    )
    responses = generate(channel, request)
    assert len({r.request_id for r in responses}) == 1 and responses[0].request_id.startswith("gen-")
    assert responses[-1].HasField("usage") and not any(r.HasField("usage") for r in responses[:-1])
    encoded = []
    for messages in by_choice(responses).values():
        reasons = [m.finish_reason for m in messages]
        assert reasons[-1] == pb.FINISH_REASON_LENGTH
        assert set(reasons[:-1]) <= {pb.FINISH_REASON_UNSPECIFIED}  # only the last one finishes
        assert sum(len(m.token_ids) for m in messages) == 12
        timings = messages[-1].timings
        # Each choice is its own request: one whose encode found the image in the embedding cache (a
        # sibling encoded it first) did no vision work and reports 0.
        assert timings.HasField("encode_s") and timings.encode_s >= 0
        encoded.append(timings.encode_s)
        assert timings.prefill_s > 0 and timings.decode_s > 0
        assert timings.e2p_bytes > 0 and timings.p2d_bytes > 0 and timings.e2e_s >= timings.decode_s
    assert max(encoded) > 0
    assert responses[-1].usage.completion_tokens == 36


def test_logprobs_and_tokenize(channel, engine):
    stub = generate_pb2_grpc.GenerationStub(channel)
    request = pb.GenerateRequest(
        prompt="The sky is", sampling=pb.SamplingParams(max_tokens=4, temperature=0, logprobs=3)
    )
    messages = generate(channel, request)
    logprobs = [lp for m in messages for lp in m.logprobs]
    assert [lp.token_id for lp in logprobs] == [t for m in messages for t in m.token_ids]
    assert all(len(lp.top) == 3 and lp.logprob <= 0 for lp in logprobs)
    assert all(
        [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True) for lp in logprobs
    )
    # Greedy: the chosen token is the most likely one.
    assert all(lp.top[0].token_id == lp.token_id and lp.top[0].logprob == lp.logprob for lp in logprobs)
    tokens = stub.Tokenize(pb.TokenizeRequest(prompt="The sky is"), metadata=AUTH, timeout=30)
    assert list(tokens.token_ids) == engine.tokenizer.encode("The sky is") and tokens.max_model_len == 2048
    png = png_bytes(56, 84, seed=2)
    chat = stub.Tokenize(
        pb.TokenizeRequest(messages=[user(image_bytes(png), "Hi")]), metadata=AUTH, timeout=30
    )
    prompt = engine.inputs.from_user_prompt("Hi", [make_image(56, 84, seed=2)])
    assert list(chat.token_ids) == list(prompt.token_ids)
    assert chat.image_tokens == sum(engine.model_config.num_image_tokens(g) for g in prompt.grids)


LONG = pb.GenerateRequest(
    messages=[user("Go on and on.")],
    sampling=pb.SamplingParams(max_tokens=1900, temperature=0, ignore_eos=True),
)


def assert_kv_freed(server: str) -> None:
    deadline = time.monotonic() + 30
    usage = kv_usage(server)
    while time.monotonic() < deadline and any(v > 0 for v in usage.values()):
        time.sleep(0.2)
        usage = kv_usage(server)
    assert usage and all(v == 0 for v in usage.values()), usage


def test_deadline_expiry_frees_kv_everywhere(server, channel):
    stub = generate_pb2_grpc.GenerationStub(channel)
    # The deadline has to pass while the request decodes, whatever this machine's speed: half of what
    # the same request took end to end just before.
    start = time.monotonic()
    assert sum(len(r.token_ids) for r in stub.Generate(LONG, metadata=AUTH, timeout=120)) == 1900
    deadline = (time.monotonic() - start) / 2
    received = []
    with pytest.raises(grpc.RpcError) as err:
        for response in stub.Generate(LONG, metadata=AUTH, timeout=deadline):
            received.append(response)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received, "the request was decoding (holding KV) when its deadline passed"
    assert_kv_freed(server)


def health_status(channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_per_role_and_reflection(channel):
    for service in ("", "epd.encode", "epd.prefill", "epd.decode", "epd.v1.Generation", "epd.v1.Admin"):
        assert health_status(channel, service) == SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        health_status(channel, "epd.nothing")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"epd.v1.Generation", "epd.v1.Admin", "grpc.health.v1.Health"} <= names


def test_admin_matches_http_and_a_role_without_worker_is_not_serving(server, channel):
    admin = admin_pb2_grpc.AdminStub(channel)
    listed = admin.ListWorkers(admin_pb2.ListWorkersRequest(), metadata=AUTH, timeout=30)
    http = httpx.get(f"{server}/admin/workers", headers=HTTP_AUTH, timeout=30).json()
    assert [(w.name, w.roles, w.phase) for w in listed.workers] == [
        (w["name"], w["roles"], w["phase"]) for w in http["workers"]
    ]
    assert dict(listed.ready) == http["ready"] == {"e": True, "p": True, "d": True}
    encoder = next(w.name for w in listed.workers if w.roles == "e")
    drained = admin.Drain(admin_pb2.WorkerRef(name=encoder), metadata=AUTH, timeout=120)
    try:
        assert drained.phase == "draining" and drained.routing == ""
        assert health_status(channel, "epd.encode") == NOT_SERVING
        assert health_status(channel, "") == NOT_SERVING
        assert health_status(channel, "epd.decode") == SERVING
    finally:
        resumed = admin.Resume(admin_pb2.WorkerRef(name=encoder), metadata=AUTH, timeout=120)
    assert resumed.phase == "active" and health_status(channel, "epd.encode") == SERVING


def test_admin_refusals(channel):
    admin = admin_pb2_grpc.AdminStub(channel)
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        for call, request in ((admin.ListWorkers, admin_pb2.ListWorkersRequest()),
                              (admin.GetSLO, admin_pb2.GetSLORequest()),
                              (admin.AddWorker, admin_pb2.AddWorkerRequest(roles="d"))):  # fmt: skip
            with pytest.raises(grpc.RpcError) as err:
                call(request, metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        admin.Drain(admin_pb2.WorkerRef(name="nobody"), metadata=AUTH, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        admin.SwitchRole(admin_pb2.SwitchRoleRequest(name="nobody", roles="x"), metadata=AUTH, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "roles" in err.value.details()


def test_get_slo_counts_requests_of_both_front_ends(server, channel, client):
    admin = admin_pb2_grpc.AdminStub(channel)
    before = admin.GetSLO(admin_pb2.GetSLORequest(), metadata=AUTH, timeout=10)
    generate(channel, pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=3)))
    client.completions.create(model=MODEL, prompt="hello", max_tokens=3)
    after = admin.GetSLO(admin_pb2.GetSLORequest(), metadata=AUTH, timeout=10)
    assert (after.ttft_target_s, after.tpot_target_s) == (2.0, 0.2)
    assert after.requests == before.requests + 2 and after.met <= after.requests
    assert after.attainment == pytest.approx(after.met / after.requests)
    assert after.goodput_rps == pytest.approx(after.met / after.window_s)
    metrics = httpx.get(f"{server}/metrics", timeout=30).text
    assert f'epd:slo_requests_total{{model_name="epd-tiny"}} {float(after.requests)}' in metrics


def test_a_video_over_grpc_and_http_gives_the_engines_tokens(channel, client, engine):
    """The same clip as bytes over gRPC and as a data URL over HTTP, sampled to 4 frames by the
    request: both give the tokens of the engine run on those 4 frames."""
    from PIL import Image

    from serving.api.video import VideoSampling, frame_indices, probe_video
    from serving.config import GatewayConfig
    from serving.stages.decode import decode_video
    from tests.e2e import videos

    clip = videos.clip(frames=8, size=(56, 42))
    parts = [pb.ContentPart(video=pb.Video(data=clip)), pb.ContentPart(text="Which way?")]
    request = pb.GenerateRequest(
        messages=[pb.Message(role="user", parts=parts)],
        sampling=pb.SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0),
        video_num_frames=4,
    )
    (messages,) = by_choice(generate(channel, request)).values()
    content = [
        {"type": "video_url", "video_url": {"url": videos.data_url(clip)}},
        {"type": "text", "text": "Which way?"},
    ]
    http = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True, "media_io_kwargs": {"video": {"num_frames": 4}}},
    )  # fmt: skip
    cfg = GatewayConfig()
    plan = frame_indices(probe_video(clip, cfg, "v"), VideoSampling(num_frames=4), cfg)
    frames = decode_video(clip, plan, cfg.video_decode_timeout_s, "v")

    prompt = engine.inputs.from_user_prompt("Which way?", [[Image.fromarray(f) for f in frames]])
    want = engine.generate([(prompt, SamplingParams(max_tokens=8, ignore_eos=True))])[0]
    assert [t for m in messages for t in m.token_ids] == want.token_ids
    assert http.choices[0].message.content == want.text
    assert http.usage.prompt_tokens == len(prompt.token_ids)
    video_tokens = prompt.token_ids.count(engine.model_config.video_token_id)
    assert http.usage.prompt_tokens_details.model_extra["video_tokens"] == video_tokens > 0
    (last,) = [m for m in messages if m.HasField("usage")]
    assert last.usage.video_tokens == video_tokens == last.usage.image_tokens


def test_pruning_over_grpc(channel, engine):
    """`image_pruning_rate` on a GenerateRequest: the engine's tokens pruned the same way, the kept
    and pruned counts in the usage; out of range, INVALID_ARGUMENT naming the field."""
    png = png_bytes(112, 84, seed=12)
    request = pb.GenerateRequest(
        messages=[user(image_bytes(png), "What is it?")],
        sampling=pb.SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0),
        image_pruning_rate=0.5,
    )
    (messages,) = by_choice(generate(channel, request)).values()
    prompt = engine.inputs.from_user_prompt("What is it?", [make_image(112, 84, seed=12)], pruning=(0.5, 0.0))
    want = engine.generate([(prompt, SamplingParams(max_tokens=6, ignore_eos=True))])[0]
    assert [t for m in messages for t in m.token_ids] == want.token_ids
    (last,) = [m for m in messages if m.HasField("usage")]
    whole = sum(engine.model_config.num_image_tokens(g) for g in prompt.grids)
    assert last.usage.image_tokens == sum(prompt.keep) == round(whole / 2)
    assert last.usage.pruned_visual_tokens == whole - sum(prompt.keep)
    request.image_pruning_rate = 1.5
    with pytest.raises(grpc.RpcError) as err:
        generate(channel, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image_pruning_rate" in err.value.details()


def test_pixel_budgets_over_grpc(channel, client, engine):
    """`max_pixels` on a GenerateRequest and `detail` on an Image: the same image tokens and replies as
    the HTTP request with `mm_processor_kwargs` and `detail`; out of range, INVALID_ARGUMENT naming it."""
    png = png_bytes(252, 168, seed=14)
    url = data_url(png)
    budget = {"mm_processor_kwargs": {"max_pixels": 9 * 784}}
    cases = [  # (gRPC request fields, gRPC image, HTTP image_url, HTTP extra body)
        ({"max_pixels": 9 * 784}, pb.Image(data=png), {"url": url}, budget),
        ({}, pb.Image(data=png, detail="low"), {"url": url, "detail": "low"}, {}),
    ]
    seen = set()
    for fields, image, http_image, extra in cases:
        request = pb.GenerateRequest(
            messages=[user(pb.ContentPart(image=image), "What?")],
            sampling=pb.SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0),
            **fields,
        )
        (messages,) = by_choice(generate(channel, request)).values()
        (last,) = [m for m in messages if m.HasField("usage")]
        content = [{"type": "image_url", "image_url": http_image}, {"type": "text", "text": "What?"}]
        http = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0,
            extra_body={"ignore_eos": True, **extra},
        )  # fmt: skip
        details = http.usage.prompt_tokens_details
        assert last.usage.image_tokens == (
            getattr(details, "image_tokens", None) or details.model_extra["image_tokens"]
        )
        assert "".join(m.text for m in messages) == http.choices[0].message.content
        seen.add(last.usage.image_tokens)
    whole = engine.model_config.num_image_tokens(engine.inputs.grid(np.zeros((168, 252, 3), np.uint8)))
    assert len(seen) == 2 and max(seen) < whole, "each budget shrank the image, each differently"
    for fields, field in (({"max_pixels": 10**12}, "max_pixels"), ({"min_pixels": 1}, "min_pixels")):
        request = pb.GenerateRequest(messages=[user(image_bytes(png), "What?")], **fields)
        with pytest.raises(grpc.RpcError) as err:
            generate(channel, request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    bad = pb.GenerateRequest(
        messages=[user(pb.ContentPart(image=pb.Image(data=png, detail="tiny")), "What?")]
    )
    with pytest.raises(grpc.RpcError) as err:
        generate(channel, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "detail" in err.value.details()
