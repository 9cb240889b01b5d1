"""After the control actor restarts: which recorded workers it starts again. A worker that died is
replaced once, even when the actor went down between starting its replacement and recording it."""

from __future__ import annotations

from serving.control.actor import lost_workers
from serving.types import parse_roles

E, P, D = parse_roles("e"), parse_roles("p"), parse_roles("d")


def test_every_recorded_worker_alive_means_nothing_to_start():
    recorded = {"e-0": (E, (0,), 0), "p-1": (P, (1,), 0)}
    assert lost_workers(recorded, {"e-0": E, "p-1": P}) == ({}, {})


def test_a_worker_that_died_unreplaced_is_started_again():
    recorded = {"e-0": (E, (0,), 0), "d-2": (D, (2,), 1)}
    lost, stand_ins = lost_workers(recorded, {"e-0": E})
    assert lost == {"d-2": (D, (2,), 1)} and stand_ins == {}


def test_a_replacement_started_before_the_record_caught_up_stands_in():
    # d-2 failed; the actor started d-5 in its place and went down before recording it.
    recorded = {"e-0": (E, (0,), 0), "d-2": (D, (2,), 1)}
    lost, stand_ins = lost_workers(recorded, {"e-0": E, "d-5": D})
    assert lost == {} and stand_ins == {"d-5": ("d-2", (D, (2,), 1))}


def test_a_stand_in_must_have_the_lost_workers_roles_and_stands_in_once():
    # Two decode workers died, one replacement was started; an unrecorded prefill worker (just added)
    # replaces neither.
    recorded = {"d-1": (D, (), 0), "d-2": (D, (), 0), "e-0": (E, (), 0)}
    lost, stand_ins = lost_workers(recorded, {"e-0": E, "d-7": D, "p-8": P})
    assert (
        list(stand_ins) == ["d-7"] and len(lost) == 1 and set(lost) | {stand_ins["d-7"][0]} == {"d-1", "d-2"}
    )
