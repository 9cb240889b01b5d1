"""The pipeline over Ray actors with NIXL between them: every topology gives the in-process tokens,
16 concurrent requests complete correctly, a burst twice the decode pool waits for blocks instead of
failing, and a cancelled request frees its KV on P and D.

One Ray cluster and one set of workers (E, P, D) serve the whole module: a topology is a routing of
the same workers, so each topology is reached by switching their roles through the actuator (which
also exercises live role switches and KV pool resizes)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serving.cluster import Cluster
from serving.engine.llm import LLMEngine
from serving.pipeline import Pipeline, Request
from serving.types import SamplingParams, parse_roles
from tests.conftest import make_image

CASES = {
    "text": [],
    "one-image": [(56, 84)],
    "two-images": [(70, 42), (28, 56)],
}
# topology → the roles of the e, p and d workers (None: drained, out of routing)
LAYOUTS = {
    "e+p+d": ("e", "p", "d"),
    "ep+d": (None, "ep", "d"),
    "e+pd": ("e", "pd", None),
    "epd": (None, "epd", None),
}


@pytest.fixture(scope="module")
def cluster(tiny_model):
    c = Cluster.start(str(tiny_model), "e+p+d", runtime="ray", engine=dict(num_kv_blocks=256, block_size=4))
    yield c
    c.shutdown()


def arrange(cluster: Cluster, topology: str) -> None:
    """Switch the three workers' roles (or drain them) into `topology`'s layout."""
    names = sorted(cluster.directory.entries(), key=lambda e: e.name.split("-")[1])
    for entry, roles in zip(names, LAYOUTS[topology], strict=True):
        if roles is None:
            cluster.plane.run(cluster.actuator.drain(entry.name))
        else:
            cluster.plane.run(cluster.actuator.switch(entry.name, parse_roles(roles)))


async def collect(pipeline: Pipeline, request: Request) -> tuple[list[int], str, object]:
    tokens, text, last = [], [], None
    async for delta in pipeline.run(request):
        tokens.extend(delta.token_ids)
        text.append(delta.text)
        last = delta
    return tokens, "".join(text), last


def run_together(cluster: Cluster, prepared: list, tag: str) -> list:
    """Every prepared (spec, arrays, params, expected) request at once; their (tokens, text, last)."""

    async def run_all():
        return await asyncio.gather(*(
            collect(cluster.pipeline, Request(f"{tag}-{i}", spec, params, arrays))
            for i, (spec, arrays, params, _) in enumerate(prepared)
        ))  # fmt: skip

    return asyncio.run(run_all())


def requests_for(engine: LLMEngine, case: str, index: int = 0, max_tokens: int = 12):
    images = [make_image(w, h, seed=index + i) for i, (w, h) in enumerate(CASES[case])]
    text = f"Request {index}: describe it."
    spec, arrays = engine.inputs.spec_from_user_prompt(text, images)
    params = SamplingParams(max_tokens=max_tokens)
    expected = engine.generate([(engine.inputs.from_user_prompt(text, images), params)])[0]
    return spec, arrays, params, expected


@pytest.mark.parametrize("topology", ["e+p+d", "ep+d", "e+pd", "epd"])
def test_every_topology_gives_the_inproc_tokens(cluster, engine, topology):
    arrange(cluster, topology)
    try:
        for case in CASES:
            spec, arrays, params, expected = requests_for(engine, case)
            tokens, text, last = asyncio.run(
                collect(cluster.pipeline, Request(f"{topology}-{case}", spec, params, arrays))
            )
            assert (tokens, text) == (expected.token_ids, expected.text), f"{topology} / {case}"
            assert last.finish_reason == expected.finish_reason
            timings = last.timings
            assert timings.prefill_s > 0 and timings.decode_s > 0 and timings.e2e_s > 0
            if arrays and topology in ("e+p+d", "e+pd"):
                # encode_s may be 0: an earlier topology left these images in E's embedding cache.
                assert timings.e2p_bytes > 0 and timings.encode_s is not None
            if topology in ("e+p+d", "ep+d"):
                assert timings.p2d_bytes > 0
    finally:
        arrange(cluster, "e+p+d")


def test_sixteen_concurrent_requests_through_one_e_one_p_one_d(cluster, engine):
    cases = list(CASES)
    prepared = [requests_for(engine, cases[i % 3], index=i, max_tokens=6 + i % 5) for i in range(16)]

    results = run_together(cluster, prepared, "c16")
    assert [tokens for tokens, _, _ in results] == [exp.token_ids for *_, exp in prepared]


def test_a_burst_past_the_decode_pool_waits_for_blocks_and_never_fails(cluster, engine):
    """Twelve requests that each carry ~43 of D's 256 blocks to their end: about twice the pool. The
    decode worker counts the blocks of KV still arriving from prefill when it admits work, so what
    does not fit waits for blocks to free; nothing fails with out-of-blocks, every answer is whole."""
    prepared = []
    for i in range(12):
        spec, arrays, _, _ = requests_for(engine, "text", index=i)
        params = SamplingParams(max_tokens=150, ignore_eos=True)
        text = f"Request {i}: describe it."
        expected = engine.generate([(engine.inputs.from_user_prompt(text, []), params)])[0]
        prepared.append((spec, arrays, params, expected))

    results = run_together(cluster, prepared, "burst")
    assert [last.finish_reason for *_, last in results] == ["length"] * 12, [r[2].error for r in results]
    assert [tokens for tokens, _, _ in results] == [exp.token_ids for *_, exp in prepared]


def test_cancel_mid_decode_frees_kv_on_p_and_d(cluster, engine):
    spec, arrays, _, _ = requests_for(engine, "one-image")
    params = SamplingParams(max_tokens=500, ignore_eos=True)

    async def start_then_cancel():
        stream = cluster.pipeline.run(Request("to-cancel", spec, params, arrays))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 5:
                break
        await stream.aclose()
        return seen

    assert asyncio.run(start_then_cancel()) == 5
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = asyncio.run(cluster.stats())
        used = {name: s.kv_blocks_used for name, s in stats.items()}
        if all(v == 0 for v in used.values()):
            break
        time.sleep(0.1)
    assert all(v == 0 for v in used.values()), used


@pytest.mark.parametrize("topology", ["e+p+d", "ep+d"])
def test_pruned_media_give_the_inproc_tokens(cluster, engine, topology):
    """Images and a video pruned at the encoder (remote, or the prefill worker's own): exactly the
    computed count of pads, and the tokens of the in-process engine pruned the same way (the kept
    tokens' positions travel with the embeddings)."""
    arrange(cluster, topology)
    try:
        frames = [make_image(56, 42, seed=40 + i) for i in range(6)]
        picture = make_image(84, 56, seed=7)
        for rates in ((0.5, 0.5), (0.75, 0.0), (0.0, 0.6)):
            text = f"pruned {rates}"
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": text}],
                }
            ]
            arrays = [np.asarray(picture), np.stack([np.asarray(f) for f in frames])]
            spec, arrays = engine.inputs.spec_from_messages(messages, arrays, pruning=rates)
            prompt = engine.inputs.from_messages(messages, [picture, frames], pruning=rates)
            assert spec.token_ids == prompt.token_ids and spec.keep == prompt.keep
            whole = engine.inputs.from_messages(messages, [picture, frames])
            assert len(whole.token_ids) - len(prompt.token_ids) == sum(
                engine.model_config.num_image_tokens(g) for g in prompt.grids
            ) - sum(prompt.keep)
            params = SamplingParams(max_tokens=10, ignore_eos=True)
            expected = engine.generate([(prompt, params)])[0]
            tokens, _, _ = asyncio.run(
                collect(cluster.pipeline, Request(f"{topology}-pruned-{rates}", spec, params, arrays))
            )
            assert tokens == expected.token_ids, (topology, rates)
    finally:
        arrange(cluster, "e+p+d")
