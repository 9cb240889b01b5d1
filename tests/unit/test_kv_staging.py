"""int8 KV staging: what the decode worker restores is the per-token, per-head symmetric quantization
of what the prefill worker held (checked against numpy), within half a step of each head's scale, in
the byte count the docs state; other blocks are untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.engine.kv_cache import KVPool
from serving.stages.kv_staging import KVStaging


def pool(dtype: torch.dtype = torch.float32, blocks: int = 12) -> KVPool:
    return KVPool(num_layers=3, num_kv_heads=2, head_dim=16, block_size=4, num_blocks=blocks, dtype=dtype)


def reference(x: np.ndarray) -> np.ndarray:
    """Quantize-dequantize by the definition: scale = max |x| over the head's dims / 127."""
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-30) / 127.0
    return np.clip(np.round(x / scale), -127, 127) * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_equals_the_definition_and_leaves_other_blocks(dtype):
    torch.manual_seed(0)
    p, d = pool(dtype), pool(dtype)
    p.data.copy_(torch.randn_like(p.data, dtype=torch.float32).mul_(3).to(dtype))
    p.data[5, 1, 0, 2, 1, 7] = 400.0  # an outlier costs its own head's token only
    d.data.fill_(-1)
    sender, receiver = KVStaging(p, 8), KVStaging(d, 8)
    table, out = [5, 2, 9], [0, 7, 3]
    staged = sender.allocate(3)
    sender.pack(p, table, staged)
    got = receiver.allocate(3)
    receiver.data[got] = sender.data[staged]  # what the transport does, byte for byte
    receiver.unpack(d, out, got)
    source = p.data[table].float().numpy()
    want = reference(source)
    restored = d.data[out].float().numpy()
    if dtype is torch.float32:
        np.testing.assert_allclose(restored, want, rtol=1e-6, atol=1e-6)
    step = np.abs(source).max(axis=-1, keepdims=True) / 127.0
    assert (np.abs(restored - source) <= step * 0.5 * 1.02 + 1e-6 + np.abs(source) * 2**-7).all()
    # the outlier's neighbours in other heads and tokens keep their own fine scales
    assert np.abs(restored[0, 1, 0, 2, 0] - source[0, 1, 0, 2, 0]).max() < 0.05
    untouched = [b for b in range(12) if b not in out]
    assert (d.data[untouched] == -1).all()


def test_bytes_on_the_wire():
    p = pool(torch.float32)
    staging = KVStaging(p, 4)
    values = 3 * 2 * 4 * 2 * 16
    assert staging.block_nbytes == values + 4 * values // 16
    assert p.block_nbytes / staging.block_nbytes == pytest.approx(4 * 16 / (16 + 4))
    assert staging.regions([1, 2, 3]) == [(staging.block_nbytes, 3 * staging.block_nbytes)]


def test_allocation_is_all_or_nothing():
    staging = KVStaging(pool(), 4)
    first = staging.allocate(3)
    assert first is not None and staging.allocate(2) is None
    staging.free(first)
    assert staging.allocate(4) is not None


def test_a_copy_being_written_outlives_its_lease():
    """A cancelled request's lease ends while its copy is written: its staging blocks come back only
    when the write is over, never to another request in between."""
    from serving.stages.kv_staging import StagedCopy

    staging = KVStaging(pool(), 4)
    copy = StagedCopy(staging, staging.allocate(4))
    copy.release()  # the lease ended mid-write
    assert staging.allocate(1) is None
    copy.written()
    assert staging.allocate(4) is not None
    staging = KVStaging(pool(), 4)
    other = StagedCopy(staging, staging.allocate(4))
    other.written()  # written first, released later: freed at the release, not before
    assert staging.allocate(1) is None
    other.release()
    assert staging.allocate(4) is not None
