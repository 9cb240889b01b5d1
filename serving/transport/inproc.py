"""In-process transport: endpoints in one process share a hub; a read is a memcpy between registered
buffers with no serialization. The reference implementation, and the transport of single-process runs."""

from __future__ import annotations

import pickle
import threading

import torch

from serving.transport.base import Region, RemoteRegions, Transfer, TransferStatus, Transport, pair_regions


class InProcessHub:
    """The endpoints of one process, by name; passed in, never a module global."""

    def __init__(self) -> None:
        self.endpoints: dict[str, InProcessTransport] = {}
        self.lock = threading.Lock()


class _DoneTransfer(Transfer):
    def __init__(self, status: TransferStatus, nbytes: int) -> None:
        self.status, self.nbytes = status, nbytes

    def poll(self) -> TransferStatus:
        return self.status


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(-1).view(torch.uint8)


class InProcessTransport(Transport):
    kind = "inproc"

    def __init__(self, name: str, hub: InProcessHub | None = None) -> None:
        super().__init__(name)
        self.hub = hub or InProcessHub()
        self.peers: set[str] = set()
        self._notifs: list[bytes] = []
        with self.hub.lock:
            self.hub.endpoints[name] = self

    def _register(self, buffer: str, tensor: torch.Tensor) -> None:
        pass  # the hub already reaches every buffer of this process

    def metadata(self) -> bytes:
        return pickle.dumps({"name": self.name})

    def _add_peer(self, metadata: bytes) -> str:
        name = pickle.loads(metadata)["name"]
        if name not in self.hub.endpoints:
            raise ValueError(f"no endpoint {name!r} in this process")
        self.peers.add(name)
        return name

    def _remove_peer(self, name: str) -> None:
        self.peers.discard(name)

    def publish(self, buffer: str, regions: list[Region]) -> RemoteRegions:
        return RemoteRegions(self.name, buffer, tuple(regions), epoch=self.epoch)

    def _read(self, source: RemoteRegions, buffer: str, regions: list[Region], tag: bytes) -> Transfer:
        owner = self.hub.endpoints.get(source.peer)
        if owner is None or source.peer not in self.peers or source.buffer not in owner.buffers:
            return _DoneTransfer(TransferStatus.FAILED, 0)
        src, dst = _bytes(owner.buffers[source.buffer]), _bytes(self.buffers[buffer])
        for s, d, n in pair_regions(list(source.regions), regions):
            dst[d : d + n].copy_(src[s : s + n])
        with self.hub.lock:
            owner._notifs.append(tag)
        return _DoneTransfer(TransferStatus.DONE, source.nbytes)

    def notifications(self) -> list[bytes]:
        with self.hub.lock:
            out, self._notifs = self._notifs, []
        return out

    def close(self) -> None:
        with self.hub.lock:
            self.hub.endpoints.pop(self.name, None)
