"""Content affinity in the pool directory: a key (a request's media, its prompt prefix) picks the same
worker every time while loads are even, other keys spread over the pool, a worker past its bounded
share of the load is passed over, and removing a worker moves only the keys it held."""

from __future__ import annotations

from collections import Counter

from serving.control.directory import AFFINITY_SLACK, PoolDirectory, WorkerEntry
from serving.types import Role, WorkerPhase, parse_roles


def pool(names: list[str]) -> PoolDirectory:
    directory = PoolDirectory()
    roles = parse_roles("e")
    for name in names:
        directory.put(WorkerEntry(name, None, roles, WorkerPhase.ACTIVE, roles))  # type: ignore[arg-type]
    return directory


def test_a_key_meets_the_same_worker_and_keys_spread():
    directory = pool(["w0", "w1", "w2", "w3"])
    picks = {f"image-{i}": directory.pick(Role.ENCODE, key=f"image-{i}").name for i in range(400)}
    assert all(directory.pick(Role.ENCODE, key=k).name == w for k, w in picks.items())
    share = Counter(picks.values())
    assert set(share) == {"w0", "w1", "w2", "w3"} and min(share.values()) > 60


def test_a_loaded_worker_is_passed_over_within_the_bound():
    directory = pool(["w0", "w1"])
    preferred = directory.pick(Role.ENCODE, key="same-image").name
    other = "w1" if preferred == "w0" else "w0"
    directory.outstanding[preferred] = 3  # mean with one more: 2; bound: ceil(1.25 × 2) = 3
    assert directory.pick(Role.ENCODE, key="same-image").name == other
    directory.outstanding[preferred] = 1
    assert directory.pick(Role.ENCODE, key="same-image").name == preferred
    assert AFFINITY_SLACK > 1


def test_removing_a_worker_moves_only_its_keys():
    directory = pool(["w0", "w1", "w2"])
    before = {f"k{i}": directory.pick(Role.ENCODE, key=f"k{i}").name for i in range(300)}
    directory.remove("w2")
    after = {k: directory.pick(Role.ENCODE, key=k).name for k in before}
    assert all(after[k] == w for k, w in before.items() if w != "w2")


def test_without_a_key_the_least_loaded_worker():
    directory = pool(["w0", "w1"])
    directory.outstanding.update({"w0": 2, "w1": 0})
    assert directory.pick(Role.ENCODE).name == "w1"
