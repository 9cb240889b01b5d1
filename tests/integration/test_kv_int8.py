"""int8 KV transfer over Ray and NIXL (`kv_transfer_dtype="int8"`): the P→D bytes are exactly the
staging blocks' (3.2× fewer than float32 blocks at the tiny model's head size, 16), the first token
(prefill's, before any transfer) is the lossless one, and every request finishes. How many whole
streams stay equal to the lossless ones is printed: on random weights that says little; `epd eval`
on the trained model is the measure of what int8 costs."""

from __future__ import annotations

import asyncio

import pytest

from serving.cluster import Cluster
from serving.pipeline import Request
from serving.types import FinishReason
from tests.integration.test_ray_pipeline import collect, requests_for

BLOCK = 4


@pytest.fixture(scope="module")
def int8_cluster(tiny_model):
    c = Cluster.start(
        str(tiny_model),
        "e+p+d",
        runtime="ray",
        engine=dict(num_kv_blocks=256, block_size=BLOCK),
        worker=dict(kv_transfer_dtype="int8"),
    )
    yield c
    c.shutdown()


def test_int8_handoff_bytes_and_first_tokens(int8_cluster, engine):
    text = engine.model_config.text
    values = text.num_layers * 2 * BLOCK * text.num_kv_heads * text.head_dim
    float_block, int8_block = 4 * values, values + 4 * values // text.head_dim
    assert float_block / int8_block == 4 * text.head_dim / (text.head_dim + 4) == 3.2  # head_dim 16
    same = 0
    for i, case in enumerate(["text", "one-image", "two-images"] * 2):
        spec, arrays, params, lossless = requests_for(engine, case, index=i, max_tokens=10)
        tokens, _, last = asyncio.run(collect(int8_cluster.pipeline, Request(f"q{i}", spec, params, arrays)))
        assert last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and tokens
        assert last.timings.p2d_bytes == -(-len(spec.token_ids) // BLOCK) * int8_block
        assert tokens[0] == lossless.token_ids[0], "the first token comes from prefill, before any transfer"
        same += tokens == lossless.token_ids
    print(f"int8 handoff: {same} of 6 streams equal to the lossless ones token for token")
