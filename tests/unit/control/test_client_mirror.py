"""A gateway's mirror of the control actor's directory: snapshots applied as they change, a worker
this gateway saw die kept out of routing until the actor drops it, names that leave the directory
leave the mirror, the controller's admission limit split over the gateways, the deployment's stop
passed on, and an actor that does not answer leaves the last directory in place."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

from serving.config import ControlConfig
from serving.control.client import ControlClient, ControlUnavailable, OperationRefused
from serving.control.records import DirectorySnapshot, OpRefused, WorkerRecord
from serving.types import Role, WorkerInfo, WorkerPhase, parse_roles


def record(name: str, roles: str, phase: WorkerPhase = WorkerPhase.ACTIVE) -> WorkerRecord:
    r = parse_roles(roles)
    info = WorkerInfo(name, r, b"", 0, 1, "node")
    routing = r if phase in (WorkerPhase.ACTIVE, WorkerPhase.DRAINING) else frozenset()
    return WorkerRecord(name, r, phase, routing, info, None, 0, (), time.time())


class Remote:
    """`actor.method.remote(...)` → an awaitable, as Ray's handles give."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


@dataclass
class FakeActor:
    snapshots: list[DirectorySnapshot] = field(default_factory=list)
    died: list[str] = field(default_factory=list)
    down: bool = False
    refuse: OpRefused | None = None

    def _snapshot(self, known):
        if self.down:
            raise RuntimeError("the actor is restarting")
        snap = self.snapshots[-1]
        state = (snap.version, snap.admission_limit, snap.gateways, snap.shutting_down)
        return None if known == state else snap

    def __getattr__(self, name: str) -> Remote:
        if name == "snapshot":
            return Remote(self._snapshot)
        if name == "worker_died":
            return Remote(self.died.append)
        if name == "drain":
            return Remote(lambda worker: self.refuse or self.snapshots[-1].workers[0])
        raise AttributeError(name)


class Handle:
    def __init__(self, name: str) -> None:
        self.name = name


def client(actor: FakeActor) -> ControlClient:
    return ControlClient(actor, ControlConfig(), "gw-test", resolve=Handle)


def test_snapshots_become_the_routing_and_a_worker_seen_dead_stays_out_until_dropped():
    async def run() -> None:
        actor = FakeActor([DirectorySnapshot(1, (record("e-0-x", "e"), record("d-1-x", "pd")))])
        c = client(actor)
        await c.sync()
        assert c.ready() == {Role.ENCODE: True, Role.PREFILL: True, Role.DECODE: True}
        assert c.directory.pick(Role.DECODE).name == "d-1-x"
        assert isinstance(c.directory.get("d-1-x").handle, Handle)

        c.worker_died("d-1-x")  # a request saw it die: out of routing here at once, and reported
        await asyncio.sleep(0)
        assert actor.died == ["d-1-x"] and c.directory.pick(Role.DECODE) is None
        # The actor has not noticed yet: its next snapshot still says active; the mirror keeps it out.
        actor.snapshots.append(DirectorySnapshot(2, (record("e-0-x", "e"), record("d-1-x", "pd"))))
        await c.sync()
        assert c.directory.pick(Role.DECODE) is None
        # Replaced under a new name: the dead one leaves the mirror, the new one is routed.
        actor.snapshots.append(DirectorySnapshot(3, (record("e-0-x", "e"), record("pd-2-x", "pd"))))
        await c.sync()
        assert {e.name for e in c.directory.entries()} == {"e-0-x", "pd-2-x"}
        assert c.directory.pick(Role.DECODE).name == "pd-2-x"

    asyncio.run(run())


def test_a_starting_worker_is_listed_but_not_routed():
    async def run() -> None:
        actor = FakeActor([DirectorySnapshot(1, (record("d-1-x", "d", WorkerPhase.STARTING),))])
        c = client(actor)
        await c.sync()
        assert c.directory.get("d-1-x") is not None and c.directory.pick(Role.DECODE) is None
        assert c.directory.coming(Role.DECODE)

    asyncio.run(run())


def test_the_admission_limit_is_split_over_the_gateways_and_the_stop_passed_on():
    async def run() -> None:
        actor = FakeActor([DirectorySnapshot(1, (record("epd-0-x", "epd"),), admission_limit=9, gateways=2)])
        c = client(actor)
        limits: list[int] = []
        stops: list[bool] = []
        c.on_admission_limit = limits.append
        c.on_shutdown = lambda: stops.append(True)
        await c.sync()
        assert limits == [5] and not stops  # ceil(9 / 2): the deployment's limit is never undershot
        actor.snapshots.append(DirectorySnapshot(1, (record("epd-0-x", "epd"),), 9, 3, shutting_down=True))
        await c.sync()
        assert limits == [5, 3] and stops == [True]

    asyncio.run(run())


def test_an_unreachable_actor_keeps_the_last_directory_and_operations_say_so():
    async def run() -> None:
        actor = FakeActor([DirectorySnapshot(1, (record("epd-0-x", "epd"),))])
        c = client(actor)
        await c.sync()
        actor.down = True
        with pytest.raises(ControlUnavailable):
            await c.sync()
        assert c.directory.pick(Role.ENCODE).name == "epd-0-x"
        actor.down, actor.refuse = False, OpRefused(409, "worker 'epd-0-x' is starting")
        with pytest.raises(OperationRefused) as refused:
            await c.drain("epd-0-x")
        assert refused.value.status == 409

    asyncio.run(run())


def test_a_worker_not_found_by_name_is_not_routed_until_it_is():
    async def run() -> None:
        actor = FakeActor([DirectorySnapshot(1, (record("d-1-x", "d"),))])
        missing = {"d-1-x"}

        def resolve(name: str) -> Handle:
            if name in missing:
                raise ValueError(f"no actor {name}")
            return Handle(name)

        c = ControlClient(actor, ControlConfig(), "gw-test", resolve=resolve)
        await c.sync()
        assert c.directory.get("d-1-x") is not None and c.directory.pick(Role.DECODE) is None
        missing.clear()  # visible now: the next snapshot routes to it
        actor.snapshots.append(DirectorySnapshot(2, (record("d-1-x", "d"),)))
        await c.sync()
        assert c.directory.pick(Role.DECODE).name == "d-1-x"

    asyncio.run(run())
