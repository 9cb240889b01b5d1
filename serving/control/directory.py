"""The live pool directory: the one versioned registry of workers, their roles, phase and load.

Pipelines read it for every leg of every request (a change is seen by the next pick); only the
actuator writes it. Each entry says which roles new work may be routed to (`routing`): during a
switch that is the roles the worker keeps, so removed roles stop receiving work at once while
requests already in flight finish where they are.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from serving.types import Role, Roles, WorkerInfo, WorkerPhase, WorkerStats

if TYPE_CHECKING:
    from serving.control.records import WorkerRecord
    from serving.stages.handles import WorkerHandle


@dataclass
class WorkerEntry:
    name: str
    handle: WorkerHandle
    roles: Roles
    phase: WorkerPhase = WorkerPhase.STARTING
    routing: Roles = frozenset()
    info: WorkerInfo | None = None
    stats: WorkerStats | None = None
    restarts: int = 0  # how many workers this one replaced, in a line
    cpus: tuple[int, ...] = ()  # pinned CPUs, kept by a replacement
    since: float = field(default_factory=time.time)  # when the phase last changed

    @property
    def routable(self) -> bool:
        return self.phase in (WorkerPhase.ACTIVE, WorkerPhase.DRAINING) and bool(self.routing)

    def record(self) -> WorkerRecord:
        """This entry as data, without its handle (what crosses processes)."""
        from serving.control.records import WorkerRecord

        return WorkerRecord(
            self.name, self.roles, self.phase, self.routing, self.info, self.stats, self.restarts,
            self.cpus, self.since,
        )  # fmt: skip


# A worker the key prefers takes new work while its load stays within this factor of the mean.
AFFINITY_SLACK = 1.25


def _weight(key: str, worker: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{worker}".encode(), digest_size=8).digest(), "big")


class PoolDirectory:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, WorkerEntry] = {}
        self.version = 0
        # Legs in flight per worker, counted by the pipelines of this process: least-loaded picking.
        self.outstanding: dict[str, int] = {}

    # -- reads (any thread) ---------------------------------------------------------------------------

    def entries(self) -> list[WorkerEntry]:
        with self._lock:
            return [replace(e) for e in self._entries.values()]

    def get(self, name: str) -> WorkerEntry | None:
        with self._lock:
            entry = self._entries.get(name)
            return replace(entry) if entry else None

    def candidates(self, role: Role, exclude: frozenset[str] = frozenset()) -> list[WorkerEntry]:
        """Workers new `role` work may go to now, least loaded first."""
        with self._lock:
            found = [
                e
                for e in self._entries.values()
                if e.routable and role in e.routing and e.name not in exclude
            ]
        return sorted(found, key=lambda e: self.outstanding.get(e.name, 0))

    def pick(
        self, role: Role, exclude: frozenset[str] = frozenset(), key: str | None = None
    ) -> WorkerEntry | None:
        """The least loaded worker; with a `key` (what the work is: its media, its prompt prefix),
        the one the key hashes to among those whose load stays within `AFFINITY_SLACK` of the mean
        (rendezvous hashing with bounded loads), so the same content meets the same worker's caches
        while no worker takes more than its share."""
        found = self.candidates(role, exclude)
        if not found:
            return None
        if key is None or len(found) == 1:
            return found[0]
        loads = {e.name: self.outstanding.get(e.name, 0) for e in found}
        bound = math.ceil(AFFINITY_SLACK * (sum(loads.values()) + 1) / len(found))
        for entry in sorted(found, key=lambda e: _weight(key, e.name), reverse=True):
            if loads[entry.name] + 1 <= bound:
                return entry
        return found[0]

    def coming(self, role: Role) -> bool:
        """Whether a worker may soon take `role` work: one starting with it, one whose roles are being
        changed (a switch may add it), or a failed one the health monitor is about to replace."""
        later = (WorkerPhase.STARTING, WorkerPhase.RECONFIGURING, WorkerPhase.FAILED)
        with self._lock:
            return any(
                e.phase in later and (role in e.roles or e.phase is WorkerPhase.RECONFIGURING)
                for e in self._entries.values()
            )

    def serving(self, role: Role) -> bool:
        """Whether some worker takes `role` work now (what /ready checks for every role)."""
        return bool(self.candidates(role))

    # -- writes (the actuator only) -------------------------------------------------------------------

    def put(self, entry: WorkerEntry) -> None:
        with self._lock:
            self._entries[entry.name] = entry
            self.version += 1

    def update(self, name: str, **changes: object) -> WorkerEntry | None:
        """Change fields of an entry (a phase change restarts its clock); None if it is gone."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None
            if "phase" in changes and changes["phase"] != entry.phase:
                changes.setdefault("since", time.time())
            updated = replace(entry, **changes)
            self._entries[name] = updated
            self.version += 1
            return replace(updated)

    def remove(self, name: str) -> WorkerEntry | None:
        with self._lock:
            entry = self._entries.pop(name, None)
            self.outstanding.pop(name, None)
            self.version += 1
            return entry

    def mark_failed(self, name: str) -> bool:
        """Take a worker out of routing at once (a pipeline saw it die); True if it was routable."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.phase in (WorkerPhase.FAILED, WorkerPhase.STOPPED):
                return False
            self._entries[name] = replace(
                entry, phase=WorkerPhase.FAILED, routing=frozenset(), since=time.time()
            )
            self.version += 1
            return True
