"""The transport interface.

The owner of some memory registers it once (a KV pool, an embedding buffer) and, per transfer,
publishes a small `RemoteRegions` ref naming byte ranges of it. The receiver pulls those ranges into
its own registered memory with `read`, which returns a `Transfer` to poll; the owner learns that the
pull finished from a notification carrying the tag the receiver attached (a lease id), and releases.
"""

from __future__ import annotations

import abc
import enum

import torch

from serving.types import Region, RemoteRegions


class TransferStatus(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in (TransferStatus.DONE, TransferStatus.FAILED, TransferStatus.EXPIRED)


class Transfer(abc.ABC):
    """One pull in flight. `poll` advances it and reports where it is; it never blocks."""

    nbytes: int

    @abc.abstractmethod
    def poll(self) -> TransferStatus: ...


class Transport(abc.ABC):
    kind: str

    def __init__(self, name: str) -> None:
        self.name = name
        self.buffers: dict[str, torch.Tensor] = {}
        self.epoch = 0  # bumped whenever registered memory changes; peers must learn the new metadata
        self.peer_epochs: dict[str, int] = {}

    def register(self, buffer: str, tensor: torch.Tensor) -> None:
        """Make a contiguous tensor's memory readable by peers under a name. Registering a name again
        replaces its memory and starts a new epoch: peers must `add_peer` the new metadata."""
        if not tensor.is_contiguous():
            raise ValueError("only contiguous tensors can be registered")
        if buffer in self.buffers:
            self._unregister(buffer, self.buffers[buffer])
            self.epoch += 1
        self.buffers[buffer] = tensor
        self._register(buffer, tensor)

    @abc.abstractmethod
    def _register(self, buffer: str, tensor: torch.Tensor) -> None: ...

    def _unregister(self, buffer: str, tensor: torch.Tensor) -> None:  # noqa: B027 - optional hook
        """Forget a buffer's memory before it is replaced."""

    @abc.abstractmethod
    def metadata(self) -> bytes:
        """What a peer needs to reach this endpoint; exchanged once per peer pair and epoch."""

    def add_peer(self, metadata: bytes, epoch: int = 0, name: str | None = None) -> str:
        """Learn a peer (or its new epoch: pass its `name`) from its metadata and warm the connection;
        returns its name. Safe to call from any thread: set-up never runs on an engine thread."""
        if name is not None and name in self.peer_epochs and self.peer_epochs[name] != epoch:
            self._remove_peer(name)  # its registered memory changed: drop the old view first
        elif name is not None and self.peer_epochs.get(name) == epoch:
            return name
        name = self._add_peer(metadata)
        self.peer_epochs[name] = epoch
        return name

    @abc.abstractmethod
    def _add_peer(self, metadata: bytes) -> str: ...

    def remove_peer(self, name: str) -> None:
        """Forget a peer (it died or left); later reads from it fail at once."""
        self.peer_epochs.pop(name, None)
        self._remove_peer(name)

    def _remove_peer(self, name: str) -> None:  # noqa: B027 - optional hook
        pass

    @abc.abstractmethod
    def publish(self, buffer: str, regions: list[Region]) -> RemoteRegions: ...

    def read(self, source: RemoteRegions, buffer: str, regions: list[Region], tag: bytes) -> Transfer:
        """Start pulling `source` into `regions` of a local buffer (equal total size); `tag` reaches
        the owner as a notification once the pull completes. A source from an epoch of the peer other
        than the one this endpoint knows fails at once instead of reading memory that moved."""
        if self.peer_epochs.get(source.peer) != source.epoch:
            return FailedTransfer()
        return self._read(source, buffer, regions, tag)

    @abc.abstractmethod
    def _read(self, source: RemoteRegions, buffer: str, regions: list[Region], tag: bytes) -> Transfer: ...

    def expect_reads(self, active: bool) -> None:  # noqa: B027 - optional hook
        """Whether peers may be pulling this endpoint's memory now (leases are out): a transport that
        must progress for their reads to complete does so only meanwhile."""

    @abc.abstractmethod
    def notifications(self) -> list[bytes]:
        """Tags of pulls from this endpoint's memory completed since the last call."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the endpoint's resources."""


class FailedTransfer(Transfer):
    nbytes = 0

    def poll(self) -> TransferStatus:
        return TransferStatus.FAILED


def pair_regions(src: list[Region], dst: list[Region]) -> list[tuple[int, int, int]]:
    """Split two region lists of equal total size at each other's boundaries:
    (src offset, dst offset, length) triples a transport can move one by one."""
    if sum(n for _, n in src) != sum(n for _, n in dst):
        raise ValueError("source and destination sizes differ")
    out = []
    si = di = 0
    s_off, s_left = src[0] if src else (0, 0)
    d_off, d_left = dst[0] if dst else (0, 0)
    while si < len(src) and di < len(dst):
        n = min(s_left, d_left)
        out.append((s_off, d_off, n))
        s_off, s_left, d_off, d_left = s_off + n, s_left - n, d_off + n, d_left - n
        if s_left == 0 and (si := si + 1) < len(src):
            s_off, s_left = src[si]
        if d_left == 0 and (di := di + 1) < len(dst):
            d_off, d_left = dst[di]
    return out


def merge_regions(regions: list[Region]) -> list[Region]:
    """Adjacent byte ranges fused into one."""
    out: list[Region] = []
    for off, n in regions:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out
