"""The scrape-time refresh of worker stats (no Ray: fake handles): every worker is read with its own
timeout and its own failure, so a dead, wedged or cancelled worker is left out of that scrape alone
and every other worker's stats are fresh."""

from __future__ import annotations

import asyncio
from unittest.mock import MagicMock

import pytest

from serving.config import ControlConfig
from serving.control.directory import WorkerEntry
from serving.control.plane import ControlPlane
from serving.types import WorkerPhase, WorkerStats, parse_roles


def stats(name: str, used: int) -> WorkerStats:
    return WorkerStats(
        name=name, roles=parse_roles("d"), phase=WorkerPhase.ACTIVE, pid=1, node="n", kv_blocks_total=10,
        kv_blocks_used=used, num_running=0, num_waiting=0, num_held=0, requests_in_flight=0,
        embedding_slots_total=0, embedding_slots_free=0, mm_cache_hits=0, mm_cache_misses=0,
        mm_cache_entries=0, images_encoded=0, leases_active=0, leases_released=0, leases_expired=0,
        requests_failed=0, engine_alive=True, epoch=0,
    )  # fmt: skip


class FakeHandle:
    """A worker whose stats call answers, hangs, fails, or is cancelled (what Ray gives for a call on
    an actor that died mid-call)."""

    def __init__(self, name: str, behaviour: str) -> None:
        self.name, self.behaviour, self.used = name, behaviour, 0

    async def stats(self) -> WorkerStats:
        if self.behaviour == "hangs":
            await asyncio.sleep(3600)
        if self.behaviour == "raises":
            raise RuntimeError("actor died")
        if self.behaviour == "cancelled":
            raise asyncio.CancelledError
        self.used += 1
        return stats(self.name, self.used)

    async def stop(self) -> None:
        pass


@pytest.fixture
def plane():
    p = ControlPlane(MagicMock(), ControlConfig(), lambda roles, i: f"w{i}", 0)
    yield p
    p.stop()


def test_one_bad_worker_does_not_freeze_the_others(plane):
    behaviours = {"a": "answers", "b": "cancelled", "c": "hangs", "d": "raises", "e": "answers"}
    for name, behaviour in behaviours.items():
        entry = WorkerEntry(name, FakeHandle(name, behaviour), parse_roles("d"), phase=WorkerPhase.ACTIVE)
        plane.directory.put(entry)
    for round_ in (1, 2):
        answered = plane.run(plane.refresh_stats(timeout_s=0.3))
        assert sorted(answered) == ["a", "e"]
        assert {n: s.kv_blocks_used for n, s in answered.items()} == {"a": round_, "e": round_}
        fresh = {e.name: e.stats.kv_blocks_used for e in plane.directory.entries() if e.stats}
        assert fresh == {"a": round_, "e": round_}
