from __future__ import annotations

import pytest
import torch

from serving.engine.kv_cache import KVPool, OutOfBlocks, block_regions


def pool(num_blocks: int = 16) -> KVPool:
    return KVPool(
        num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, num_blocks=num_blocks, dtype=torch.float32
    )


def test_allocate_grow_free_and_usage():
    p = pool()
    table: list[int] = []
    p.grow(table, 9)  # 9 tokens → 3 blocks of 4
    assert table == [0, 1, 2]
    assert p.num_free == 13 and p.usage == pytest.approx(3 / 16)
    p.grow(table, 12)  # still fits
    assert len(table) == 3
    p.grow(table, 13)
    assert len(table) == 4
    p.free(table)
    assert table == [] and p.num_free == 16 and p.usage == 0.0
    with pytest.raises(OutOfBlocks):
        p.allocate(17)


def test_lowest_ids_first_keeps_regions_few():
    p = pool()
    a = p.allocate(3)
    b = p.allocate(2)
    p.free(a)
    c = p.allocate(4)  # reuses 0,1,2 then the next free id
    assert c == [0, 1, 2, 5]
    assert block_regions(c) == [(0, 3), (5, 1)]
    assert block_regions(b) == [(3, 2)]
    assert block_regions([]) == []


def test_export_import_roundtrip_is_bit_exact():
    src, dst = pool(), pool(32)
    table = src.allocate(3)
    src.data[table] = torch.randn(3, *src.data.shape[1:])
    kv = src.export_blocks(table, num_tokens=11)
    assert kv.data.is_contiguous() and kv.data.shape[0] == 3
    dst.allocate(5)
    new_table = dst.import_blocks(kv)
    assert new_table == [5, 6, 7]
    assert torch.equal(dst.data[new_table], src.data[table])
    assert kv.num_tokens == 11
