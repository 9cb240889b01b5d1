"""Leases: memory a sender holds for a receiver, until it is pulled, cancelled or its deadline passes."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Lease:
    lease_id: str
    request_id: str
    deadline: float
    on_release: Callable[[], None]


class LeaseTable:
    def __init__(self, owner: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._owner = owner
        self._clock = clock
        self._ids = itertools.count()
        self._leases: dict[str, Lease] = {}
        self.released = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, request_id: str, ttl_s: float, on_release: Callable[[], None]) -> str:
        lease_id = f"{self._owner}/{next(self._ids)}"
        self._leases[lease_id] = Lease(lease_id, request_id, self._clock() + ttl_s, on_release)
        return lease_id

    def release(self, lease_id: str) -> bool:
        """Free what the lease holds (after a pull or a cancel). False if it was already gone."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        lease.on_release()
        self.released += 1
        return True

    def release_request(self, request_id: str) -> int:
        ids = [lid for lid, lease in self._leases.items() if lease.request_id == request_id]
        return sum(self.release(lid) for lid in ids)

    def expire(self) -> list[str]:
        """Free every lease past its deadline; they are counted as expiries."""
        now = self._clock()
        gone = [lid for lid, lease in self._leases.items() if lease.deadline <= now]
        for lid in gone:
            self._leases.pop(lid).on_release()
        self.expired += len(gone)
        return gone
