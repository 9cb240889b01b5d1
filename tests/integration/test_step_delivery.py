"""Per-step delivery: a worker hands a consumer at most one message per engine step holding every one of
its requests' deltas (a consumer that lags takes several steps at once; never one message per token per
request), with the same tokens and timings as the per-request streams, and an eviction reaches the
consumer as that request's end alone."""

from __future__ import annotations

import itertools

import pytest

from serving.config import EngineConfig, WorkerConfig
from serving.stages.outbox import StreamEnd
from serving.stages.worker import StageWorker
from serving.transport.inproc import InProcessHub
from serving.types import PromptSpec, Role, SamplingParams

_ids = itertools.count()


@pytest.fixture
def worker(tiny_model):
    w = StageWorker(
        WorkerConfig(
            name=f"epd-step-{next(_ids)}",
            roles="epd",
            engine=EngineConfig(model=str(tiny_model), num_kv_blocks=256, block_size=4),
            transport="inproc",
        ),
        hub=InProcessHub(),
    )
    yield w
    w.shutdown()


def spec(worker: StageWorker, text: str) -> PromptSpec:
    return worker.engine.inputs.spec_from_text(text)


def test_one_message_per_step_carries_every_request(worker):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = ["One.", "Two words.", "Three little words."]
    alone = [
        [t for d in worker.generate(f"alone-{i}", spec(worker, p), params) for t in d.token_ids]
        for i, p in enumerate(prompts)
    ]
    ids = [f"r{i}" for i in range(3)]
    stream = worker.subscribe("c1")
    for rid, p in zip(ids, prompts, strict=True):
        worker.start_generate("c1", rid, spec(worker, p), params)
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    messages, finished = 0, set()
    timings = {}
    while len(finished) < len(ids):
        batch = next(stream)
        messages += 1
        for delta in batch:
            tokens[delta.request_id].extend(delta.token_ids)
            if delta.finished:
                finished.add(delta.request_id)
                timings[delta.request_id] = delta.timings
    assert [tokens[r] for r in ids] == alone
    deltas = sum(len(t) for t in tokens.values())
    assert messages <= deltas // 2, f"{messages} messages for {deltas} deltas: not batched per step"
    assert all(t is not None and t.decode_s is not None for t in timings.values())
    assert (
        len(worker.ledger) == 0 and worker.engine.runner.pool.num_free == worker.engine.runner.pool.num_blocks
    )


def test_eviction_ends_that_request_alone(worker):
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    short = SamplingParams(max_tokens=6, ignore_eos=True)
    stream = worker.subscribe("c2")
    worker.start_generate("c2", "long", spec(worker, "Go on for a while."), params)
    worker.start_generate("c2", "other", spec(worker, "Short."), short)
    first = next(stream)
    assert {d.request_id for d in first} <= {"long", "other"}
    worker.loop.call(lambda: worker._end_streams(["long"]))
    ends, other_tokens, other_done = [], 0, False
    while not other_done:
        for item in next(stream):
            if isinstance(item, StreamEnd):
                ends.append(item.request_id)
            elif item.request_id == "other":
                other_tokens += len(item.token_ids)
                other_done = other_done or item.finished
    assert ends == ["long"]
    assert other_tokens + sum(len(d.token_ids) for d in first if d.request_id == "other") == 6
    worker.cancel("long")
    assert worker.ledger.using(frozenset({Role.DECODE})) == 0
