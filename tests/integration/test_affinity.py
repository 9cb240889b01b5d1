"""Content affinity with two encode workers (local runtime): requests that repeat an image meet the
worker that encoded it, so every repeat is an embedding-cache hit, while distinct images spread over
both workers; the answers equal the in-process engine's."""

from __future__ import annotations

import pytest

from serving.cluster import Cluster
from serving.types import Role, SamplingParams
from tests.conftest import make_image

# Which worker an image hashes to depends on the workers' names (new each run): with 16 distinct
# images both workers get some but once in 2^15 runs, where 6 left it to one worker in 1 run of 32.
DISTINCT, REPEATS = 16, 3


@pytest.fixture(scope="module")
def cluster(tiny_model):
    c = Cluster.start(
        str(tiny_model), "e+pd", encode=2, runtime="local", engine=dict(num_kv_blocks=256, block_size=4)
    )
    yield c
    c.shutdown()


def test_repeated_images_are_cache_hits_on_the_worker_that_encoded_them(cluster, engine):
    images = [make_image(56 + 14 * (i % 3), 56, seed=300 + i) for i in range(DISTINCT)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    requests, expected = [], []
    for _ in range(REPEATS):
        for i, image in enumerate(images):
            spec, arrays = engine.inputs.spec_from_user_prompt(f"Image {i}?", [image])
            requests.append((spec, params, arrays))
    for i, image in enumerate(images):
        prompt = engine.inputs.from_user_prompt(f"Image {i}?", [image])
        expected.append(engine.generate([(prompt, params)])[0].token_ids)
    before = {n: s for n, s in cluster.stats_now().items()}
    results = [cluster.generate([r])[0] for r in requests]  # one at a time: loads stay even
    for k, result in enumerate(results):
        assert result.token_ids == expected[k % DISTINCT]
    encoders = [e.name for e in cluster.directory.entries() if Role.ENCODE in e.roles]
    stats = cluster.stats_now()
    hits = sum(stats[n].mm_cache_hits - before[n].mm_cache_hits for n in encoders)
    misses = sum(stats[n].mm_cache_misses - before[n].mm_cache_misses for n in encoders)
    assert (hits, misses) == (DISTINCT * (REPEATS - 1), DISTINCT), "each image encoded once, then hit"
    assert all(stats[n].mm_cache_misses > before[n].mm_cache_misses for n in encoders), "both workers encode"
