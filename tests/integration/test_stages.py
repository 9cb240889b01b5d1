"""Stage workers in this process, over both transports: transfer integrity, the embedding cache,
lease expiry and cancellation. (The same workers run as Ray actors in test_ray_pipeline.py.)"""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from serving.config import EngineConfig, WorkerConfig
from serving.stages.embeddings import image_key
from serving.stages.worker import StageWorker
from serving.transport.inproc import InProcessHub
from serving.types import SamplingParams, StageTimings
from tests.conftest import make_image

_ids = itertools.count()


@pytest.fixture(params=["inproc", "nixl"])
def workers(request, tiny_model):
    """An encode, a prefill (that may also decode: `generate`) and a decode worker, introduced."""
    kind = request.param
    extra = {"hub": InProcessHub()} if kind == "inproc" else {}
    engine = EngineConfig(model=str(tiny_model), num_kv_blocks=128, block_size=4)
    made = {
        role: StageWorker(
            WorkerConfig(
                name=f"{role}-{next(_ids)}",
                roles="pd" if role == "p" else role,
                engine=engine,
                transport=kind,
                lease_ttl_s=30,
            ),
            **extra,
        )
        for role in "epd"
    }
    infos = [w.info() for w in made.values()]
    for w in made.values():
        for info in infos:
            if info.name != w.name:
                w.add_peer(info.metadata, info.epoch, info.name)
    yield made
    for w in made.values():
        w.shutdown()


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def tokens_of(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """(blocks, layers, 2, block_size, ...) → (layers, 2, first n tokens, ...)."""
    return blocks.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)[:, :, :n]


def spec_for(worker: StageWorker, images, text: str = "Describe the images."):
    return worker.engine.inputs.spec_from_user_prompt(text, images)


def test_embeddings_arrive_byte_for_byte(workers):
    e, p = workers["e"], workers["p"]
    images = [make_image(56, 84, seed=1), make_image(70, 42, seed=2)]
    _, arrays = spec_for(e, images)
    ref = e.encode("r1", arrays)
    sent = torch.cat([e.cache.get(image_key(a)) for a in arrays])
    received = p._pull_embeddings("r1", ref, StageTimings(), lambda embeds: embeds)
    assert received.shape == sent.shape and torch.equal(received.view(torch.uint8), sent.view(torch.uint8))
    assert wait_for(lambda: e.stats().leases_active == 0), "the pull's notification releases E's lease"
    assert e.stats().leases_released == 1 and e.stats().embedding_slots_free == e.cfg.embedding_slots


def test_kv_arrives_byte_for_byte_and_decode_matches_colocated(workers):
    p, d = workers["p"], workers["d"]
    spec, arrays = spec_for(p, [make_image(60, 60, seed=3)])
    params = SamplingParams(max_tokens=10)
    colocated = [t for delta in p.generate("alone", spec, params, None, arrays) for t in delta.token_ids]

    result = p.prefill("r2", spec, params, None, arrays)
    assert result.kv is not None and result.kv.num_tokens == len(spec.token_ids)
    table = p.loop.call(lambda: list(p.engine.held["r2"].block_table))
    sent = p.engine.runner.pool.data[table].clone()
    stream = d.decode("r2", spec, params, result.kv)
    tokens = list(result.delta.token_ids) + next(stream).token_ids  # first decode step
    d_table = d.loop.call(lambda: list(d.engine._seqs["r2"].block_table[: len(table)]))
    received = d.engine.runner.pool.data[d_table]
    # Compare the prompt's tokens only: the decode step has since appended its own after them.
    assert torch.equal(tokens_of(received, result.kv.num_tokens), tokens_of(sent, result.kv.num_tokens))
    tokens += [t for delta in stream for t in delta.token_ids]
    assert tokens == colocated
    assert wait_for(lambda: p.stats().kv_blocks_used == 0), "P frees its KV once D has pulled it"


def test_embedding_cache_hits_and_one_pixel_misses(workers):
    e, p = workers["e"], workers["p"]
    image = make_image(56, 56, seed=5)
    spec, arrays = spec_for(e, [image])
    params = SamplingParams(max_tokens=8)

    def run(request_id: str, arrays):
        ref = e.encode(request_id, arrays)
        return [t for delta in p.generate(request_id, spec, params, ref, None) for t in delta.token_ids]

    first = run("a", arrays)
    encoded = e.stats().images_encoded
    assert run("b", arrays) == first
    stats = e.stats()
    assert stats.images_encoded == encoded, "a cache hit must not run the vision tower"
    assert stats.mm_cache_hits == 1
    changed = arrays[0].copy()
    changed[0, 0, 0] ^= 1
    run("c", [changed])
    assert e.stats().images_encoded == encoded + 1 and e.stats().mm_cache_misses == 2


def test_kv_lease_never_pulled_expires_and_is_counted(tiny_model):
    engine = EngineConfig(model=str(tiny_model), num_kv_blocks=64, block_size=4)
    p = StageWorker(
        WorkerConfig(name=f"p-{next(_ids)}", roles="p", engine=engine, transport="inproc", lease_ttl_s=0.3)
    )
    try:
        spec, arrays = spec_for(p, [])
        result = p.prefill("lost", spec, SamplingParams(max_tokens=5), None, arrays)
        assert result.kv is not None
        assert p.stats().kv_blocks_used > 0 and p.stats().leases_active == 1
        assert wait_for(lambda: p.stats().leases_active == 0)
        stats = p.stats()
        assert stats.leases_expired == 1 and stats.kv_blocks_used == 0 and stats.num_held == 0
    finally:
        p.shutdown()


def test_cancel_mid_decode_frees_kv_everywhere(workers):
    p, d = workers["p"], workers["d"]
    spec, arrays = spec_for(p, [make_image(56, 56, seed=9)])
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    result = p.prefill("cancel-me", spec, params, None, arrays)
    stream = d.decode("cancel-me", spec, params, result.kv)
    next(stream)
    next(stream)
    assert d.stats().kv_blocks_used > 0
    stream.close()  # the consumer goes away mid-decode
    assert wait_for(lambda: d.stats().kv_blocks_used == 0 and d.stats().num_running == 0)
    assert wait_for(lambda: p.stats().kv_blocks_used == 0)


def test_cancel_while_waiting_for_a_vision_batch_frees_everything(workers):
    """A client that goes away while its images wait behind another request's vision batch: they are
    never encoded, no embedding slot or lease is taken for them, and the request's call fails."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from serving.types import WorkerUnavailable

    e = workers["e"]
    encode, entered, release = e.engine.runner.encode, threading.Event(), threading.Event()
    batches: list[int] = []

    def held(images):
        batches.append(len(images))
        if len(batches) == 1:  # the first request's batch waits while the second queues behind it
            entered.set()
            assert release.wait(10)
        return encode(images)

    e.engine.runner.encode = held
    _, first = spec_for(e, [make_image(56, 56, seed=31)])
    _, second = spec_for(e, [make_image(56, 56, seed=32), make_image(28, 56, seed=33)])
    with ThreadPoolExecutor(3) as pool:
        a = pool.submit(e.encode, "first", first)
        assert entered.wait(10)
        b = pool.submit(e.encode, "gone", second)
        assert wait_for(lambda: e.ledger.get("gone") is not None)
        time.sleep(0.1)  # its images are queued for the next vision batch
        cancel = pool.submit(e.cancel, "gone")  # runs on the engine thread once the held pass ends
        release.set()
        cancel.result(10)
        with pytest.raises(WorkerUnavailable, match="cancelled"):
            b.result(10)
        ref = a.result(10)
    assert batches == [1], "the cancelled request's two images were never encoded"
    stats = e.stats()
    assert stats.leases_active == 1 and e.ledger.get("gone") is None  # the first request's lease only
    e.loop.call(lambda: e.leases.release(ref.lease_id))
    assert wait_for(lambda: e.stats().embedding_slots_free == e.cfg.embedding_slots)
