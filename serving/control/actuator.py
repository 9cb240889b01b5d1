"""The actuator: the only writer of the pool directory. It adds, removes, drains, switches the roles
of, and replaces workers, all without restarting the deployment or reloading anyone's weights.

switch(worker, roles):
  1. stop routing the removed roles to it (directory) and make the worker refuse them (its ledger);
  2. wait until its ledger holds nothing for them; past the drain deadline, its remaining streams are
     evicted and migrate to other workers;
  3. `set_roles`: the worker resizes its KV pool and embedding buffer for the new roles. A resize
     needs the worker empty, so if one is needed while kept roles still have work, routing stops for
     all roles until that work is done too (only E and P legs can be in flight then: short);
  4. the new transport metadata (new epoch) reaches every peer before the worker is routed again;
  5. active under the new roles.
remove = drain, then stop. replace (after a failure) = out of routing at once, stop (kill), forget,
start a new worker with the same roles, introduce it to its peers, route to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serving.config import ControlConfig
from serving.control.directory import PoolDirectory, WorkerEntry
from serving.types import ALL_ROLES, Roles, WorkerInfo, WorkerPhase, WorkerUnavailable, roles_label

if TYPE_CHECKING:
    from serving.stages.factory import WorkerFactory
    from serving.stages.handles import WorkerHandle

log = logging.getLogger(__name__)
_DRAIN_POLL_S = 0.05
# A worker being adopted may still be loading its model (one a restarted control plane finds mid-start).
_ADOPT_TIMEOUT_S = 120.0


class ActuatorError(ValueError):
    """An operation that cannot be done as asked (unknown worker, invalid roles); safe to show."""


@dataclass
class ControlCounters:
    """What the actuator did, for metrics and benchmarks."""

    switches: int = 0
    drains: int = 0
    evictions: int = 0
    restarts: int = 0
    failures: int = 0
    added: int = 0
    removed: int = 0
    switch_seconds: list[float] = field(default_factory=list)


class Actuator:
    def __init__(
        self,
        directory: PoolDirectory,
        factory: WorkerFactory,
        cfg: ControlConfig,
        name_for: Callable[[Roles, int], str],
        first_index: int = 0,
    ) -> None:
        self.directory = directory
        self.factory = factory
        self.cfg = cfg
        self._name_for = name_for
        self._ids = itertools.count(first_index)
        self._locks: dict[str, asyncio.Lock] = {}
        self.counters = ControlCounters()

    # -- start-up -------------------------------------------------------------------------------------

    async def adopt(
        self, handles: list[WorkerHandle], cpus: dict[str, tuple[int, ...]] | None = None
    ) -> list[str]:
        """Take workers started elsewhere (the deployment's first ones, or the live ones a restarted
        control plane finds): introduce every pair, route. One that does not answer is left out (its
        name is not returned)."""
        answers = await asyncio.gather(*(_info(h) for h in handles))
        found = [(h, info) for h, info in zip(handles, answers, strict=True) if info is not None]
        await asyncio.gather(
            *(
                h.add_peer(info.metadata, info.epoch, info.name)
                for h, _ in found
                for _, info in found
                if info.name != h.name
            )
        )
        for handle, info in found:
            pinned = (cpus or {}).get(info.name, ())
            self.directory.put(
                WorkerEntry(info.name, handle, info.roles, WorkerPhase.ACTIVE, info.roles, info, cpus=pinned)
            )
        return [info.name for _, info in found]

    # -- operations -----------------------------------------------------------------------------------

    async def add(self, roles: Roles, cpus: tuple[int, ...] = (), restarts: int = 0) -> WorkerEntry:
        """Start a new worker with `roles`, introduce it to every peer, route to it."""
        name = self._name_for(roles, next(self._ids))
        placeholder = StartingHandle(name)
        self.directory.put(WorkerEntry(name, placeholder, roles, WorkerPhase.STARTING, cpus=cpus))
        try:
            handle = await self.factory.start(name, roles, cpus)
            info = await handle.info()
            await self._introduce(handle, info)
        except BaseException:
            self.directory.remove(name)
            raise
        entry = self.directory.update(
            name, handle=handle, phase=WorkerPhase.ACTIVE, routing=roles, info=info, restarts=restarts
        )
        self.counters.added += 1
        assert entry is not None
        return entry

    async def switch(self, name: str, roles: Roles) -> WorkerEntry:
        """Move a worker to `roles` without restarting it (see the module's steps)."""
        if not roles:
            raise ActuatorError("a worker needs at least one role")
        async with self._lock(name):
            entry = self._get(name)
            start = time.perf_counter()
            removed = entry.roles - roles
            await self._drain(entry, removed, routing=entry.roles & roles)
            try:
                info = await entry.handle.set_roles(roles)
            except WorkerUnavailable:
                # A resize needs the worker empty: stop routing the kept roles as well, briefly.
                self.directory.update(name, phase=WorkerPhase.RECONFIGURING)
                await self._drain(entry, ALL_ROLES, routing=frozenset())
                info = await entry.handle.set_roles(roles)
            await self._publish(info)
            updated = self.directory.update(
                name, roles=roles, routing=roles, phase=WorkerPhase.ACTIVE, info=info
            )
            self.counters.switches += 1
            self.counters.switch_seconds.append(time.perf_counter() - start)
            log.info("worker %s now serves %s", name, roles_label(roles))
            assert updated is not None
            return updated

    async def drain(self, name: str) -> WorkerEntry:
        """Stop routing anything to a worker and wait until it holds nothing; it stays up, idle."""
        async with self._lock(name):
            entry = self._get(name)
            await self._drain(entry, ALL_ROLES, routing=frozenset())
            self.counters.drains += 1
            return self._get(name)

    async def resume(self, name: str) -> WorkerEntry:
        """Route to a drained worker again, under its roles."""
        return await self.switch(name, self._get(name).roles)

    async def remove(self, name: str) -> None:
        """Drain a worker, then stop it and forget it."""
        async with self._lock(name):
            entry = self._get(name)
            await self._drain(entry, ALL_ROLES, routing=frozenset())
            self.directory.update(name, phase=WorkerPhase.STOPPED)
            await self._forget(entry)
            self.counters.removed += 1

    async def replace(self, name: str) -> WorkerEntry | None:
        """A failed worker (dead, unreachable, wedged): out of routing, stopped, forgotten; a new one
        takes its roles (up to the deployment's restart limit). The health monitor calls this once
        per failed worker."""
        entry = self.directory.get(name)
        if entry is None:
            return None
        log.warning("replacing failed worker %s", name)
        self.directory.mark_failed(name)
        self.counters.failures += 1
        await self._forget(entry)
        if self.counters.restarts >= self.cfg.max_worker_restarts:
            log.error("restart limit reached: worker %s is not replaced", name)
            return None
        self.counters.restarts += 1
        return await self.add(entry.roles, entry.cpus, restarts=entry.restarts + 1)

    # -- steps ----------------------------------------------------------------------------------------

    async def _drain(self, entry: WorkerEntry, removed: Roles, routing: Roles) -> None:
        """Stop routing `removed` (keep `routing`), make the worker refuse them, wait until it holds
        nothing for them; past the deadline evict what is left (it migrates) and wait for that."""
        phase = WorkerPhase.DRAINING if removed else entry.phase
        self.directory.update(entry.name, routing=routing, phase=phase)
        if not removed:
            return
        busy = await entry.handle.stop_accepting(removed)
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        while busy and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
            busy = await entry.handle.using(removed)
        if busy:
            self.counters.evictions += await entry.handle.evict(removed)
            while await entry.handle.using(removed):
                await asyncio.sleep(_DRAIN_POLL_S)

    async def _introduce(self, handle: WorkerHandle, info: WorkerInfo) -> None:
        """A new worker and every live worker learn each other's transport metadata."""
        peers = [
            (e, e.info)
            for e in self.directory.entries()
            if e.info is not None
            and e.name != info.name
            and e.phase not in (WorkerPhase.FAILED, WorkerPhase.STOPPED)
        ]
        await asyncio.gather(
            *(handle.add_peer(known.metadata, known.epoch, e.name) for e, known in peers),
            *(_quiet(e.handle.add_peer(info.metadata, info.epoch, info.name)) for e, _ in peers),
        )

    async def _publish(self, info: WorkerInfo) -> None:
        """Every peer learns a worker's new epoch before it is routed again."""
        peers = [e for e in self.directory.entries() if e.name != info.name and e.info is not None]
        await asyncio.gather(
            *(_quiet(e.handle.add_peer(info.metadata, info.epoch, info.name)) for e in peers)
        )

    async def _forget(self, entry: WorkerEntry) -> None:
        peers = [e for e in self.directory.entries() if e.name != entry.name]
        await asyncio.gather(*(_quiet(e.handle.remove_peer(entry.name)) for e in peers))
        await _quiet(entry.handle.stop())
        self.directory.remove(entry.name)

    def _get(self, name: str) -> WorkerEntry:
        entry = self.directory.get(name)
        if entry is None:
            raise ActuatorError(f"no worker named {name!r}")
        if entry.phase in (WorkerPhase.FAILED, WorkerPhase.STOPPED, WorkerPhase.STARTING):
            raise ActuatorError(f"worker {name!r} is {entry.phase.value}")
        return entry

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


class StartingHandle:
    """The handle of a worker still starting: any call says it is not available yet."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        async def unavailable(*_: Any) -> Any:
            raise WorkerUnavailable(f"worker {self.name} is still starting")

        return unavailable


async def _info(handle: WorkerHandle) -> WorkerInfo | None:
    try:
        async with asyncio.timeout(_ADOPT_TIMEOUT_S):
            return await handle.info()
    except Exception as exc:  # noqa: BLE001 - dead or unreachable: not adopted
        log.warning("worker %s did not answer when adopted: %s", handle.name, type(exc).__name__)
        return None


async def _quiet(call: Awaitable[Any]) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(10):
            await call
