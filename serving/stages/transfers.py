"""A stage worker's transport endpoint: its peers, leases on what peers pull from it, the pulls'
notifications, and its own pulls from peers. Mixed into `StageWorker`."""

from __future__ import annotations

import time
from typing import Any

from serving.transport import TransferStatus
from serving.types import Role, TransferFailed

_POLL_S = 0.0005


class TransferEndpoint:
    def add_peer(self: Any, metadata: bytes, epoch: int = 0, name: str | None = None) -> str:
        return self.transport.add_peer(metadata, epoch, name)

    def remove_peer(self: Any, name: str) -> None:
        self.transport.remove_peer(name)

    def _housekeeping(self: Any) -> None:
        for tag in self.transport.notifications():
            self.leases.release(tag.decode())
        self.leases.expire()
        self.transport.expect_reads(len(self.leases) > 0)

    def _hold(self: Any, request_id: str, role: Role, on_release: Any) -> str:
        """Grant a lease for what this request leaves here for a peer to pull; entered in the ledger."""

        def release() -> None:
            on_release()
            self.ledger.update(request_id, lambda e: (e.leases.discard(lease), e.roles.discard(role)))

        lease = self.leases.grant(request_id, self.cfg.lease_ttl_s, release)
        self.ledger.update(request_id, lambda e: e.leases.add(lease))
        self.transport.expect_reads(True)  # a peer will pull it: progress the transport meanwhile
        return lease

    def _transfer(self: Any, source: Any, buffer: str, regions: list[tuple[int, int]], lease_id: str) -> None:
        transfer = self.transport.read(source, buffer, regions, lease_id.encode())
        while not (status := transfer.poll()).final:
            time.sleep(_POLL_S)
        if status is not TransferStatus.DONE:
            raise TransferFailed(f"transfer from {source.peer} {status.value}")
