"""NIXL transport (UCX backend): host DRAM on CPU, VRAM on CUDA. Agent metadata is exchanged once per
peer pair and the connection warmed then; a pull is a NIXL READ whose notification is the tag."""

from __future__ import annotations

import os
import pickle
import threading
import time

import torch

from serving.transport.base import (
    FailedTransfer,
    Region,
    RemoteRegions,
    Transfer,
    TransferStatus,
    Transport,
    pair_regions,
)

# UCX needs an active-message transport: shared-memory-only settings fail at agent creation. Keep
# whatever the operator chose as long as it includes tcp.
if "tcp" not in os.environ.get("UCX_TLS", "tcp"):
    os.environ["UCX_TLS"] = os.environ["UCX_TLS"] + ",tcp"


_IDLE_PROGRESS_S = 1.0
_WARMUP_PROGRESS_S = 5.0


def _mem(tensor: torch.Tensor) -> tuple[str, int]:
    return ("VRAM", tensor.device.index or 0) if tensor.is_cuda else ("DRAM", 0)


class _NixlTransfer(Transfer):
    def __init__(self, agent, handle, nbytes: int) -> None:  # noqa: ANN001 - nixl's own types
        self.agent, self.handle, self.nbytes = agent, handle, nbytes
        self.status = TransferStatus.TRANSFERRING

    def poll(self) -> TransferStatus:
        if self.status is TransferStatus.TRANSFERRING:
            state = self.agent.check_xfer_state(self.handle)
            if state != "PROC":
                self.status = TransferStatus.DONE if state == "DONE" else TransferStatus.FAILED
                self.agent.release_xfer_handle(self.handle)
        return self.status


class NixlTransport(Transport):
    kind = "nixl"

    def __init__(self, name: str, progress_interval_s: float = 0.0005) -> None:
        super().__init__(name)
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        # NIXL's own progress thread polls with no delay and burns a whole core per agent even when
        # idle (measured: 1.0 core; three idle workers saturated a 2-core machine). Instead a thread of
        # ours progresses the agent between short sleeps; over TCP an owner must progress for peers'
        # READs of its memory to complete. STRICT sync makes the agent safe to call from two threads.
        config = nixl_agent_config(
            enable_prog_thread=False, sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT, backends=["UCX"]
        )
        self.agent = nixl_agent(name, config)
        self.peers: set[str] = set()
        self._registrations: dict[str, object] = {}
        self._peer_lock = threading.Lock()
        self._notifs: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reads_expected = False  # leases are out: peers may be reading our memory
        self._hot_until = 0.0  # progress fast until then: a connection with a new peer is warming up
        self._wake = threading.Event()
        self._interval = progress_interval_s
        self._progress = threading.Thread(
            target=self._progress_loop, name=f"nixl-progress-{name}", daemon=True
        )
        self._progress.start()

    def _progress_loop(self) -> None:
        # Fast while peers may be pulling (their READs need our progress over TCP); otherwise once a
        # second, so an idle worker does not wake 2,000 times a second.
        while not self._stop.is_set():
            if self._reads_expected or time.monotonic() < self._hot_until:
                self._stop.wait(self._interval)
            else:
                self._wake.wait(_IDLE_PROGRESS_S)
                self._wake.clear()
            tags = [tag for tags in self.agent.get_new_notifs().values() for tag in tags]
            if tags:
                with self._lock:
                    self._notifs.extend(tags)

    def expect_reads(self, active: bool) -> None:
        self._reads_expected = active
        if active:
            self._wake.set()

    def _register(self, buffer: str, tensor: torch.Tensor) -> None:
        self._registrations[buffer] = self.agent.register_memory(tensor)

    def _unregister(self, buffer: str, tensor: torch.Tensor) -> None:
        if (descs := self._registrations.pop(buffer, None)) is not None:
            self.agent.deregister_memory(descs)

    def metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def _add_peer(self, metadata: bytes) -> str:
        self._hot_until = time.monotonic() + _WARMUP_PROGRESS_S
        self._wake.set()
        with self._peer_lock:
            name = self.agent.add_remote_agent(metadata)
            name = name.decode() if isinstance(name, bytes) else name
            self.agent.make_connection(name)
            self.peers.add(name)
        return name

    def _remove_peer(self, name: str) -> None:
        with self._peer_lock:
            if name in self.peers:
                self.peers.discard(name)
                self.agent.remove_remote_agent(name)

    def publish(self, buffer: str, regions: list[Region]) -> RemoteRegions:
        tensor = self.buffers[buffer]
        mem, dev = _mem(tensor)
        # NIXL checks remote descriptors against the owner's registered memory (known from its
        # metadata), so the base address is all a receiver needs to describe any sub-range.
        descriptors = pickle.dumps((tensor.data_ptr(), mem, dev))
        return RemoteRegions(self.name, buffer, tuple(regions), descriptors, self.epoch)

    def _read(self, source: RemoteRegions, buffer: str, regions: list[Region], tag: bytes) -> Transfer:
        if source.peer not in self.peers:
            return FailedTransfer()
        remote_base, remote_mem, remote_dev = pickle.loads(source.descriptors)
        local = self.buffers[buffer]
        local_mem, local_dev = _mem(local)
        # NIXL pairs descriptors one to one, so both sides are cut at each other's boundaries.
        pairs = pair_regions(list(source.regions), regions)
        try:
            remote_descs = self.agent.get_xfer_descs(
                [(remote_base + s, n, remote_dev) for s, _, n in pairs], remote_mem
            )
            local_descs = self.agent.get_xfer_descs(
                [(local.data_ptr() + d, n, local_dev) for _, d, n in pairs], local_mem
            )
            handle = self.agent.initialize_xfer("READ", local_descs, remote_descs, source.peer, tag)
            state = self.agent.transfer(handle)
        except Exception:  # noqa: BLE001 - any NIXL error is a failed transfer, never a crashed worker
            return FailedTransfer()
        transfer = _NixlTransfer(self.agent, handle, source.nbytes)
        if state == "ERR":
            transfer.status = TransferStatus.FAILED
            self.agent.release_xfer_handle(handle)
        return transfer

    def notifications(self) -> list[bytes]:
        with self._lock:
            out, self._notifs = self._notifs, []
        return out

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._progress.join(timeout=2)
        for peer in list(self.peers):
            self.agent.remove_remote_agent(peer)
        self.peers.clear()
