"""A worker's ledger: for each request, which of the worker's roles it is using and what it holds.

Everything a worker keeps for a request (a stream sink, leases on embeddings or KV, embedding slots,
a place in the engine) is entered here when taken and released through one `release` call. So
"cancel" is one call, and "drained for roles R" has a definition: no entry uses any role of R.
Admission to a role and draining it go through the same lock, so no request slips in after a drain
has begun.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.types import Role, Roles, TokenDelta, WorkerUnavailable


@dataclass
class Holding:
    """What the worker holds for one request."""

    request_id: str
    roles: set[Role] = field(default_factory=set)
    sink: queue.Queue[TokenDelta] | None = None
    leases: set[str] = field(default_factory=set)
    slot_lists: list[list[int]] = field(default_factory=list)  # embedding slots outside any lease
    in_engine: bool = False

    @property
    def empty(self) -> bool:
        return not (self.roles or self.leases or self.slot_lists or self.in_engine)


class Ledger:
    def __init__(self, accepting: Roles) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Holding] = {}
        self.accepting: Roles = accepting

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def admit(self, request_id: str, role: Role) -> Holding:
        """Enter a request under `role`, or refuse it when the worker does not take that role now."""
        with self._lock:
            if role not in self.accepting:
                raise WorkerUnavailable(f"the worker does not take {role.name.lower()} work now")
            entry = self._entries.setdefault(request_id, Holding(request_id))
            entry.roles.add(role)
            return entry

    def stop_accepting(self, roles: Roles) -> None:
        with self._lock:
            self.accepting = self.accepting - roles

    def accept(self, roles: Roles) -> None:
        with self._lock:
            self.accepting = roles

    def get(self, request_id: str) -> Holding | None:
        with self._lock:
            return self._entries.get(request_id)

    def update(self, request_id: str, change: Callable[[Holding], None]) -> None:
        """Change an entry under the lock (it is created if the request had none)."""
        with self._lock:
            entry = self._entries.setdefault(request_id, Holding(request_id))
            change(entry)
            if entry.empty:
                del self._entries[request_id]

    def done(self, request_id: str, role: Role) -> None:
        """The request no longer uses `role` here (what it still holds stays entered)."""
        self.update(request_id, lambda e: e.roles.discard(role))

    def pop(self, request_id: str) -> Holding | None:
        with self._lock:
            return self._entries.pop(request_id, None)

    def using(self, roles: Roles) -> int:
        """Requests using any of `roles`: zero means drained for them."""
        with self._lock:
            return sum(1 for e in self._entries.values() if e.roles & roles)

    def request_ids(self, roles: Roles | None = None) -> list[str]:
        """Every request entered, or those using any of `roles`."""
        with self._lock:
            return [rid for rid, e in self._entries.items() if roles is None or e.roles & roles]
