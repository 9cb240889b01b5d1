"""The service layer without Ray or HTTP: a fake pipeline under `GenerationService`. Typed requests in,
typed deltas out; images as bytes or data URLs give the same prompt; bounds are refused by name; no
worker is a 503 and a timeout a 504, and both free admission and cancel every choice; finished
requests are accounted once (metrics, SLO)."""

from __future__ import annotations

import asyncio
import base64
import io
from unittest.mock import AsyncMock, MagicMock

import numpy as np
import pytest

from serving.api.errors import APIError
from serving.api.requests import GenerateRequest, ImageInput, Message, Sampling, TextInput, check_bounds
from serving.api.service import GenerationService
from serving.config import GatewayConfig
from serving.types import FinishReason, NoWorkerAvailable, Role, StageTimings, TokenDelta
from tests.conftest import make_image


class FakePipeline:
    """Each request: `tokens` deltas of one token, the last one finished with timings. `hang` makes
    it wait forever after the first; `unavailable` raises NoWorkerAvailable before any delta."""

    def __init__(self, tokens: int = 2, hang: bool = False, unavailable: bool = False) -> None:
        self.tokens, self.hang, self.unavailable = tokens, hang, unavailable
        self.requests: list = []
        self.cancelled = 0

    async def run(self, request):
        self.requests.append(request)
        if self.unavailable:
            raise NoWorkerAvailable(Role.ENCODE)
        try:
            for i in range(self.tokens):
                if self.hang and i == 1:
                    await asyncio.sleep(3600)
                last = i == self.tokens - 1
                yield TokenDelta(
                    request.request_id, [10 + i], f"t{i}", FinishReason.LENGTH if last else None,
                    timings=StageTimings(prefill_s=0.01, decode_s=0.02) if last else None,
                )  # fmt: skip
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def service(tiny_model, pipeline: FakePipeline | None = None, **cfg) -> GenerationService:
    plane = MagicMock()
    plane.pipeline = pipeline or FakePipeline()
    plane.directory.entries.return_value = []
    plane.ready.return_value = {role: True for role in Role}
    plane.refresh_stats = AsyncMock(return_value={})
    plane.window = None
    plane.control = (0, "")
    plane.replicas = {}  # one gateway
    return GenerationService(GatewayConfig(**cfg), str(tiny_model), "m", plane, 2048)


def chat(*parts, n: int = 1, **sampling) -> GenerateRequest:
    content = tuple(TextInput(p) if isinstance(p, str) else p for p in parts) or "hello"
    return GenerateRequest("m", messages=(Message("user", content),), sampling=Sampling(**sampling), n=n)


def sample(svc: GenerationService, name: str, **labels: str) -> float:
    return svc.metrics.registry.get_sample_value(name, {"model_name": "m", **labels}) or 0.0


async def run(svc: GenerationService, request: GenerateRequest, **kw) -> list:
    generation = await svc.generate(request, asyncio.get_running_loop().time(), **kw)
    try:
        return [item async for item in generation.events()]
    finally:
        await generation.close()


def test_a_request_streams_typed_deltas_and_is_accounted_once(tiny_model):
    async def scenario():
        svc = service(tiny_model)
        events = await run(svc, chat(n=2, max_tokens=5, seed=3, temperature=0.5))
        by_choice = {i: [d for c, d in events if c.index == i] for i in (0, 1)}
        assert [[d.token_ids for d in ds] for ds in by_choice.values()] == [[[10], [11]], [[10], [11]]]
        assert [ds[-1].finish_reason for ds in by_choice.values()] == [FinishReason.LENGTH] * 2
        seeds = sorted(r.params.seed for r in svc.pipeline.requests)
        assert seeds == [3, 4]  # choice i samples with seed + i
        choices = [c for c, _ in events[-1:]]
        usage = svc.usage([c for c in {id(c): c for c, _ in events}.values()])
        assert usage.completion_tokens == 4 and usage.prompt_tokens == len(choices[0].spec.token_ids)
        assert sample(svc, "epd:request_success_total", finished_reason="length") == 2
        assert sample(svc, "epd:generation_tokens_total") == 4
        assert sample(svc, "epd:stage_duration_seconds_count", stage="prefill") == 2
        assert svc.admission.running == 0 and svc.admission.sequences == 0
        slo = svc.slo()
        assert slo.requests == 2 and slo.attainment == slo.met / 2 and slo.ttft_target_s == 2.0

    asyncio.run(scenario())


def png(seed: int = 1) -> bytes:
    buf = io.BytesIO()
    make_image(56, 42, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def test_images_as_bytes_and_as_data_urls_give_the_same_prompt(tiny_model):
    async def scenario():
        svc = service(tiny_model)
        url = "data:image/png;base64," + base64.b64encode(png()).decode()
        await run(svc, chat(ImageInput(data=png()), "what is it?", max_tokens=2))
        await run(svc, chat(ImageInput(url=url), "what is it?", max_tokens=2))
        by_bytes, by_url = svc.pipeline.requests
        assert by_bytes.spec == by_url.spec and by_bytes.spec.grids
        assert all(np.array_equal(a, b) for a, b in zip(by_bytes.images, by_url.images, strict=True))

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "request_, param",
    [
        (chat(temperature=2.5), "temperature"),
        (chat(temperature=float("nan")), "temperature"),
        (chat(top_p=0.0), "top_p"),
        (chat(top_k=-2), "top_k"),
        (chat(n=0), "n"),
        (chat(n=17), "n"),
        (chat(seed=2**63), "seed"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(logprobs=21), "logprobs"),
        (chat(stop=("x" * 1025,)), "stop.0"),
        (chat(stop=tuple("abcdefghijklmnopq")), "stop"),
        (GenerateRequest("m"), "messages"),
        (GenerateRequest("m", messages=(Message("robot", "x"),)), "messages.0.role"),
        (GenerateRequest("m", messages=(Message("user", "x"),), prompts=("y",)), "prompt"),
        (chat(ImageInput(param="messages.0.parts.0.image")), "messages.0.parts.0.image"),
    ],
)
def test_bounds_are_refused_by_name(request_, param):
    with pytest.raises(APIError) as err:
        check_bounds(request_)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, "invalid_value")
    assert f"'{param}'" in err.value.message


def test_budgets_and_model_are_checked_before_any_work(tiny_model):
    async def scenario():
        svc = service(tiny_model, max_sequences_per_request=4, max_images_per_request=1)
        cases = [
            (GenerateRequest("m", prompts=("a", "b"), n=4), 400, "too_many_sequences"),
            (chat(ImageInput(data=png()), ImageInput(data=png(2))), 400, "too_many_images"),
            (GenerateRequest("other", prompts=("a",)), 404, "model_not_found"),
            (GenerateRequest("m", prompts=("",)), 400, None),
            (chat(max_tokens=5000), 400, "context_length_exceeded"),
        ]
        for request, status, code in cases:
            with pytest.raises(APIError) as err:
                await run(svc, request)
            assert (err.value.status, err.value.code) == (status, code)
        assert svc.pipeline.requests == [] and svc.admission.running == 0

    asyncio.run(scenario())


def test_no_worker_for_a_stage_is_503_before_any_answer_and_frees_admission(tiny_model):
    async def scenario():
        svc = service(tiny_model, FakePipeline(unavailable=True))
        with pytest.raises(APIError) as err:
            await svc.generate(chat(n=3), 0.0)
        assert (err.value.status, err.value.code) == (503, "no_worker_available")
        assert err.value.headers == {"Retry-After": "5"}
        assert svc.admission.running == 0 and svc.admission.sequences == 0

    asyncio.run(scenario())


def test_a_timeout_is_504_cancels_every_choice_and_counts_aborts(tiny_model):
    async def scenario():
        svc = service(tiny_model, FakePipeline(tokens=3, hang=True))
        with pytest.raises(APIError) as err:
            await run(svc, chat(n=2), timeout_s=0.3)
        assert (err.value.status, err.value.code) == (504, "timeout")
        assert svc.pipeline.cancelled == 2  # both choices' pipelines were cancelled
        assert sample(svc, "epd:request_success_total", finished_reason="abort") == 2
        assert svc.admission.running == 0

    asyncio.run(scenario())


def test_closing_early_cancels_the_choices(tiny_model):
    """What a client that cancels causes: the front end stops iterating and closes."""

    async def scenario():
        svc = service(tiny_model, FakePipeline(tokens=3, hang=True))
        generation = await svc.generate(chat(n=2), 0.0)
        first = [item async for item, _ in _take(generation.events(), 2)]
        assert len(first) == 2
        await generation.close()
        assert svc.pipeline.cancelled == 2 and svc.admission.running == 0
        assert sample(svc, "epd:request_success_total", finished_reason="abort") == 2

    asyncio.run(scenario())


async def _take(events, count: int):
    async for item in events:
        yield item, None
        count -= 1
        if not count:
            return


def test_api_keys(tiny_model):
    svc = service(tiny_model, api_keys=("k1", "k2"))
    svc.authorize("Bearer k2")
    svc.authorize("bearer k1")
    for header in (None, "", "k1", "Bearer k3", "Basic k1", "Bearer  k1"):
        with pytest.raises(APIError) as err:
            svc.authorize(header)
        assert err.value.status == 401 and err.value.error_type == "authentication"
    service(tiny_model).authorize(None)  # no keys configured: open
