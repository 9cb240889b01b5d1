"""The live control plane over real Ray actors and NIXL: role switches without restart, workers
added and removed, worker processes killed mid-stream (decode migration, replacement), the only
encode worker killed, and per-request fault containment. After every failure, no lease, reservation
or KV block is left on any surviving worker (checked well inside the lease TTL, which is long here)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from serving.api.grammars import output_grammar
from serving.api.requests import OutputFormat, OutputKind
from serving.cluster import Cluster
from serving.config import ControlConfig
from serving.pipeline import Request
from serving.types import FinishReason, NoWorkerAvailable, Role, SamplingParams, WorkerPhase, parse_roles
from tests.conftest import make_image

LEASE_TTL_S = 120.0  # far above any wait below: freed memory was freed by the failure path, not expiry


@pytest.fixture(scope="module")
def cluster(tiny_model):
    control = ControlConfig(
        health_interval_s=0.5, health_timeout_s=5, wait_for_worker_s=60, drain_timeout_s=5
    )
    c = Cluster.start(
        str(tiny_model),
        "e+p+d",
        decode=2,
        runtime="ray",
        engine=dict(num_kv_blocks=256, block_size=4),
        worker=dict(lease_ttl_s=LEASE_TTL_S),
        control=control,
    )
    yield c
    c.shutdown()


# A JSON schema whose answers, from random weights, run to a few dozen tokens: long enough to be
# decoding when a worker is killed or switched under it.
RECORD = {
    "type": "object",
    "properties": {
        "names": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 4, "maxItems": 4},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["names", "count"],
    "additionalProperties": False,
}


def prepared(
    engine, index: int, images: int = 1, max_tokens: int = 24, seed: int | None = None, schema: bool = False
):
    pics = [make_image(56 + 14 * i, 42, seed=index * 7 + i) for i in range(images)]
    text = f"Request {index}: describe it."
    spec, arrays = engine.inputs.spec_from_user_prompt(text, pics)
    grammar = output_grammar(OutputFormat(OutputKind.JSON_SCHEMA, RECORD)) if schema else None
    params = SamplingParams(
        max_tokens=max_tokens,
        ignore_eos=not schema,  # a schema ends its answer; the stop is part of what is compared
        temperature=0.8 if seed else 0.0,
        seed=seed,
        grammar=grammar,
    )
    expected = engine.generate([(engine.inputs.from_user_prompt(text, pics), params)])[0]
    return spec, arrays, params, expected


async def collect(cluster: Cluster, request: Request, hook=None, after_tokens: int = 3):
    """Tokens and the last delta of a request; `hook` runs once `after_tokens` have streamed (so the
    request is decoding by then)."""
    tokens, last = [], None
    async for delta in cluster.pipeline.run(request):
        tokens.extend(delta.token_ids)
        last = delta
        if hook is not None and len(tokens) >= after_tokens:
            await hook()
            hook = None
    return tokens, last


def workers_with(cluster: Cluster, role: Role) -> list:
    return [e for e in cluster.directory.entries() if role in e.roles and e.phase is WorkerPhase.ACTIVE]


def assert_idle(cluster: Cluster) -> None:
    """Nothing held anywhere: polled briefly (pull receipts are asynchronous), far inside the TTL."""
    deadline = time.monotonic() + 5
    while True:
        stats = cluster.stats_now()
        busy = {
            n: (s.leases_active, s.requests_in_flight, s.kv_blocks_used, s.num_held)
            for n, s in stats.items()
            if (s.leases_active, s.requests_in_flight, s.kv_blocks_used, s.num_held) != (0, 0, 0, 0)
        }
        if not busy:
            return
        assert time.monotonic() < deadline, f"still held after the requests ended: {busy}"
        time.sleep(0.05)


def wait_until(predicate, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_one_worker_walked_through_every_role_gives_the_inproc_tokens(cluster, engine):
    walker = cluster.plane.run(cluster.actuator.add(parse_roles("e"))).name
    others = {e.name: e.roles for e in cluster.directory.entries() if e.name != walker}
    for step, role in enumerate((Role.ENCODE, Role.PREFILL, Role.DECODE, Role.ENCODE)):
        cluster.plane.run(cluster.actuator.switch(walker, frozenset({role})))
        # Only the walker takes `role` now, so every request goes through it for that stage.
        for name, roles in others.items():
            if role in roles:
                cluster.plane.run(cluster.actuator.drain(name))
        try:
            for images, schema in ((0, False), (1, False), (2, False), (1, True)):
                max_tokens = 120 if schema else 10
                spec, arrays, params, expected = prepared(
                    engine,
                    10 * step + images,
                    images,
                    max_tokens=max_tokens,
                    seed=7 if schema else None,
                    schema=schema,
                )
                request = Request(f"walk-{step}-{images}-{schema}", spec, params, arrays)
                tokens, last = asyncio.run(collect(cluster, request))
                assert tokens == expected.token_ids, f"{role} / {images} images / schema {schema}"
                assert last.finish_reason == expected.finish_reason
        finally:
            for name, roles in others.items():
                if role in roles:
                    cluster.plane.run(cluster.actuator.resume(name))
    assert cluster.directory.get(walker).info.epoch >= 2, "switches that resize re-register the memory"
    cluster.plane.run(cluster.actuator.remove(walker))
    assert cluster.directory.get(walker) is None
    assert_idle(cluster)


@pytest.mark.parametrize(
    ("seeded", "schema"),
    [(False, False), (True, False), (True, True)],
    ids=["greedy", "seeded", "json-schema"],
)
def test_killing_a_decode_worker_mid_stream_migrates_with_the_same_tokens(cluster, engine, seeded, schema):
    """With a JSON schema, the new decode worker rebuilds the grammar's state from the streamed tokens:
    the migrated answer is the undisturbed one, and valid."""
    cases = [
        prepared(
            engine,
            40 + i,
            images=i % 2,
            max_tokens=120 if schema else 48,
            seed=100 + i if seeded else None,
            schema=schema,
        )
        for i in range(6)
    ]
    migrations = cluster.pipeline.counters.migrations
    restarts = cluster.actuator.counters.restarts
    victim = None

    async def kill_the_busiest_decode_worker():
        nonlocal victim
        if victim is None:
            stats = cluster.stats_now()
            decoders = [e for e in workers_with(cluster, Role.DECODE)]
            target = max(decoders, key=lambda e: stats[e.name].requests_in_flight)
            victim = target.name
            os.kill(stats[victim].pid, signal.SIGKILL)  # as an operator or the OOM killer would

    async def run_all():
        async def one(i, case):
            spec, arrays, params, _ = case
            await asyncio.sleep(0.05 * i)
            hook = kill_the_busiest_decode_worker if i == 3 else None
            return await collect(cluster, Request(f"kill-{seeded}-{schema}-{i}", spec, params, arrays), hook)

        return await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))

    results = asyncio.run(run_all())
    for (tokens, last), (*_, expected) in zip(results, cases, strict=True):
        assert last.finish_reason == expected.finish_reason, last.error
        assert tokens == expected.token_ids
        if schema:
            assert set(json.loads(expected.text)) == {"names", "count"}
    assert cluster.pipeline.counters.migrations > migrations
    wait_until(
        lambda: cluster.actuator.counters.restarts > restarts and len(workers_with(cluster, Role.DECODE)) == 2
    )
    assert cluster.directory.get(victim) is None, "the dead worker left the directory"
    assert_idle(cluster)


def test_a_drained_only_encoder_is_a_503_at_once_and_text_goes_on(cluster, engine):
    """Nothing can encode and nothing that could is on its way (the encoder drained, no replacement
    starting): an image request is refused at once, not after the wait for a worker."""
    (encoder,) = workers_with(cluster, Role.ENCODE)
    image_case = prepared(engine, 80, images=1, max_tokens=4)
    text_case = prepared(engine, 81, images=0, max_tokens=4)
    cluster.plane.run(cluster.actuator.drain(encoder.name))
    try:
        spec, arrays, params, _ = image_case
        start = time.perf_counter()
        with pytest.raises(NoWorkerAvailable):
            asyncio.run(collect(cluster, Request("drained-e-image", spec, params, arrays)))
        assert time.perf_counter() - start < 1.0
        spec, arrays, params, expected = text_case
        tokens, _ = asyncio.run(collect(cluster, Request("drained-e-text", spec, params, arrays)))
        assert tokens == expected.token_ids
    finally:
        cluster.plane.run(cluster.actuator.resume(encoder.name))
    assert_idle(cluster)


def test_killing_the_only_encode_worker_waits_or_503s_and_text_goes_on(cluster, engine):
    (encoder,) = workers_with(cluster, Role.ENCODE)
    image_case = prepared(engine, 70, images=1, max_tokens=8)
    text_case = prepared(engine, 71, images=0, max_tokens=8)
    os.kill(cluster.stats_now()[encoder.name].pid, signal.SIGKILL)

    async def run_both():
        async def image():
            spec, arrays, params, _ = image_case
            try:
                return await collect(cluster, Request("no-e-image", spec, params, arrays))
            except NoWorkerAvailable:
                return "503"

        async def text():
            spec, arrays, params, _ = text_case
            return await collect(cluster, Request("no-e-text", spec, params, arrays))

        return await asyncio.gather(image(), text())

    image_result, (text_tokens, _) = asyncio.run(run_both())
    assert text_tokens == text_case[3].token_ids, "text-only requests never need E"
    if image_result != "503":  # it waited for the replacement
        tokens, last = image_result
        assert tokens == image_case[3].token_ids and last.finish_reason != FinishReason.ERROR
    wait_until(lambda: len(workers_with(cluster, Role.ENCODE)) == 1)
    spec, arrays, params, expected = image_case
    tokens, _ = asyncio.run(collect(cluster, Request("e-back", spec, params, arrays)))
    assert tokens == expected.token_ids
    assert_idle(cluster)


def test_added_worker_takes_requests_and_a_removed_one_drains_first(cluster, engine):
    added = cluster.plane.run(cluster.actuator.add(parse_roles("d"))).name
    originals = [e.name for e in workers_with(cluster, Role.DECODE) if e.name != added]
    for name in originals:
        cluster.plane.run(cluster.actuator.drain(name))
    spec, arrays, params, expected = prepared(engine, 80, images=1, max_tokens=200)
    seen_on_added = []

    async def run_and_remove():
        async def check_and_remove():
            seen_on_added.append(cluster.stats_now()[added].requests_in_flight)
            for name in originals:
                await cluster.plane.call(cluster.actuator.resume(name))
            # Removing drains first: the stream in flight finishes, or migrates at the deadline.
            await cluster.plane.call(cluster.actuator.remove(added))

        return await collect(cluster, Request("add-remove", spec, params, arrays), check_and_remove)

    tokens, last = asyncio.run(run_and_remove())
    assert seen_on_added == [1], "the only routed decode worker took the request"
    assert tokens == expected.token_ids and last.finish_reason == expected.finish_reason
    assert cluster.directory.get(added) is None
    assert_idle(cluster)


@pytest.mark.parametrize("stage", ["encode", "prefill", "decode"])
def test_a_fault_inside_one_request_fails_it_alone(cluster, engine, stage):
    role = {"encode": Role.ENCODE, "prefill": Role.PREFILL, "decode": Role.DECODE}[stage]
    cases = [prepared(engine, 90 + i, images=1, max_tokens=12) for i in range(4)]
    for entry in workers_with(cluster, role):
        cluster.plane.run(entry.handle.inject_fault(stage, f"fault-{stage}-0"))

    async def run_all():
        return await asyncio.gather(*(
            collect(cluster, Request(f"fault-{stage}-{i}", spec, params, arrays))
            for i, (spec, arrays, params, _) in enumerate(cases)
        ))  # fmt: skip

    results = asyncio.run(run_all())
    (_, failed), *rest = results
    assert failed.finish_reason == FinishReason.ERROR and failed.error
    assert failed.failed_stage is role, "the failing stage travels as a type, not in the message"
    for (tokens, last), (*_, expected) in zip(rest, cases[1:], strict=True):
        assert tokens == expected.token_ids and last.finish_reason == expected.finish_reason
    spec, arrays, params, expected = prepared(engine, 99, images=1, max_tokens=8)
    tokens, _ = asyncio.run(collect(cluster, Request(f"after-{stage}", spec, params, arrays)))
    assert tokens == expected.token_ids, "the worker keeps serving"
    assert all(s.engine_alive for s in cluster.stats_now().values())
    assert_idle(cluster)


def test_a_drain_past_its_deadline_evicts_streams_and_they_migrate(cluster, engine):
    spec, arrays, params, expected = prepared(engine, 120, images=1, max_tokens=600)
    evictions = cluster.actuator.counters.evictions
    migrations = cluster.pipeline.counters.migrations
    cfg = cluster.actuator.cfg
    cluster.actuator.cfg = cfg.model_copy(update={"drain_timeout_s": 0.2})  # far shorter than the stream
    switched = []

    async def switch_its_decoder():
        stats = cluster.stats_now()
        busy = next(e.name for e in workers_with(cluster, Role.DECODE) if stats[e.name].requests_in_flight)
        await cluster.plane.call(cluster.actuator.switch(busy, parse_roles("p")))
        switched.append(busy)

    try:
        tokens, last = asyncio.run(
            collect(cluster, Request("evicted", spec, params, arrays), switch_its_decoder, after_tokens=20)
        )
    finally:
        cluster.actuator.cfg = cfg
        for name in switched:
            cluster.plane.run(cluster.actuator.switch(name, parse_roles("d")))
    assert tokens == expected.token_ids and last.finish_reason == expected.finish_reason
    assert cluster.actuator.counters.evictions > evictions
    assert cluster.pipeline.counters.migrations > migrations
    assert_idle(cluster)


def test_a_compacted_stream_survives_its_decode_worker_killed(cluster, engine):
    """Visual-KV compaction on (budget 0.5): the re-prefill after the kill scores the same prompt,
    keeps the same rows, and the migrated stream equals the undisturbed compacted one."""
    from dataclasses import replace

    spec, arrays, params, _ = prepared(engine, 150, images=2, max_tokens=60)
    params = replace(params, visual_kv_budget=0.5)
    undisturbed, _ = asyncio.run(collect(cluster, Request("compact-quiet", spec, params, arrays)))
    migrations = cluster.pipeline.counters.migrations
    restarts = cluster.actuator.counters.restarts

    async def kill_its_decoder():
        stats = cluster.stats_now()
        busy = next(e.name for e in workers_with(cluster, Role.DECODE) if stats[e.name].requests_in_flight)
        os.kill(stats[busy].pid, signal.SIGKILL)

    tokens, last = asyncio.run(
        collect(cluster, Request("compact-killed", spec, params, arrays), kill_its_decoder, after_tokens=10)
    )
    assert tokens == undisturbed and last.finish_reason == FinishReason.LENGTH
    assert cluster.pipeline.counters.migrations > migrations
    wait_until(
        lambda: cluster.actuator.counters.restarts > restarts and len(workers_with(cluster, Role.DECODE)) == 2
    )
    assert_idle(cluster)
