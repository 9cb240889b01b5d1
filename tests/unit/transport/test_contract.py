"""One contract, every transport: what a receiver pulls is byte for byte what the owner published,
the owner is notified with the receiver's tag, and failures are states, not exceptions."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from serving.engine.kv_cache import KVPool, block_regions
from serving.transport import TransferStatus, make_transport
from serving.transport.base import merge_regions, pair_regions
from serving.transport.inproc import InProcessHub

_names = itertools.count()


@pytest.fixture(params=["inproc", "nixl"])
def endpoints(request):
    kind = request.param
    extra = {"hub": InProcessHub()} if kind == "inproc" else {}
    owner = make_transport(kind, f"owner-{next(_names)}", **extra)
    receiver = make_transport(kind, f"receiver-{next(_names)}", **extra)
    yield owner, receiver
    receiver.close()
    owner.close()


def connect(owner, receiver) -> None:
    """Peers learn each other after registering: an owner's metadata describes its registered memory."""
    assert receiver.add_peer(owner.metadata()) == owner.name


def wait(transfer, timeout_s: float = 10.0) -> TransferStatus:
    deadline = time.monotonic() + timeout_s
    while not (status := transfer.poll()).final and time.monotonic() < deadline:
        time.sleep(0.001)
    return status


def wait_notifs(endpoint, timeout_s: float = 10.0) -> list[bytes]:
    deadline = time.monotonic() + timeout_s
    while not (tags := endpoint.notifications()) and time.monotonic() < deadline:
        time.sleep(0.001)
    return tags


def test_scattered_regions_arrive_intact_and_owner_is_notified(endpoints):
    owner, receiver = endpoints
    src = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)
    dst = torch.zeros(1 << 20, dtype=torch.uint8)
    owner.register("buf", src)
    receiver.register("buf", dst)
    connect(owner, receiver)
    ref = owner.publish("buf", [(100, 5000), (70000, 3000), (500000, 12345)])
    assert ref.nbytes == 20345
    # The receiver lays the same bytes out differently: the transport must cut at both sides' edges.
    transfer = receiver.read(ref, "buf", [(0, 9000), (20000, 11345)], tag=b"lease-7")
    assert wait(transfer) is TransferStatus.DONE
    sent = torch.cat([src[100:5100], src[70000:73000], src[500000:512345]])
    got = torch.cat([dst[0:9000], dst[20000:31345]])
    assert torch.equal(got, sent)
    assert wait_notifs(owner) == [b"lease-7"]


def test_kv_blocks_move_between_pools_bit_exact(endpoints):
    owner, receiver = endpoints
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    src, dst = KVPool(num_blocks=32, **kw), KVPool(num_blocks=40, **kw)
    owner.register("kv", src.data)
    receiver.register("kv", dst.data)
    connect(owner, receiver)
    src.data.copy_(torch.randn(src.data.shape))
    src_table = [3, 4, 5, 9, 10]
    dst.allocate(7)
    dst_table = dst.allocate(5)
    size = src.block_nbytes
    ref = owner.publish("kv", [(b * size, n * size) for b, n in block_regions(src_table)])
    regions = [(b * size, n * size) for b, n in block_regions(dst_table)]
    assert wait(receiver.read(ref, "kv", regions, tag=b"kv")) is TransferStatus.DONE
    assert torch.equal(dst.data[dst_table], src.data[src_table])


def test_unknown_peer_is_a_failed_transfer(endpoints):
    owner, receiver = endpoints
    owner.register("buf", torch.zeros(64, dtype=torch.uint8))
    receiver.register("buf", torch.zeros(64, dtype=torch.uint8))
    connect(owner, receiver)
    ref = owner.publish("buf", [(0, 64)])
    stranger = type(ref)("nobody", "buf", ref.regions, ref.descriptors)
    assert wait(receiver.read(stranger, "buf", [(0, 64)], tag=b"x")) is TransferStatus.FAILED


def test_pair_and_merge_regions():
    assert pair_regions([(0, 10), (50, 5)], [(100, 3), (200, 12)]) == [(0, 100, 3), (3, 200, 7), (50, 207, 5)]
    assert merge_regions([(0, 4), (4, 4), (10, 2)]) == [(0, 8), (10, 2)]
    with pytest.raises(ValueError):
        pair_regions([(0, 10)], [(0, 9)])
