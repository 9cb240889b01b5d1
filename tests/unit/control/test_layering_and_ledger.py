"""The control plane's pieces without Ray: the layering rule (the pipeline, the control plane and the
gateway's admin API load no torch), the ledger's drain bookkeeping, the directory's routing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving.control.directory import PoolDirectory, WorkerEntry
from serving.stages.ledger import Ledger
from serving.types import Role, WorkerPhase, WorkerUnavailable, parse_roles, roles_label


@pytest.mark.parametrize("module", ["serving.pipeline", "serving.control.plane", "serving.control.actuator"])
def test_orchestration_modules_import_without_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules, 'serving.engine' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], f"{module} pulled in torch or the engine"


def test_roles_parse_and_print():
    assert parse_roles("pd") == {Role.PREFILL, Role.DECODE} and roles_label(parse_roles("d,e")) == "ed"
    for bad in ("", "x", "pp", "e p z"):
        with pytest.raises(ValueError):
            parse_roles(bad)


def test_ledger_drains_only_the_roles_asked_for():
    ledger = Ledger(accepting=parse_roles("pd"))
    ledger.admit("a", Role.PREFILL)
    ledger.admit("b", Role.DECODE)
    ledger.stop_accepting(frozenset({Role.DECODE}))
    with pytest.raises(WorkerUnavailable):
        ledger.admit("c", Role.DECODE)
    ledger.admit("c", Role.PREFILL)  # the kept role still takes work
    assert ledger.using(frozenset({Role.DECODE})) == 1
    ledger.done("b", Role.DECODE)
    assert ledger.using(frozenset({Role.DECODE})) == 0 and len(ledger) == 2
    ledger.update("a", lambda e: e.leases.add("lease-1"))
    ledger.done("a", Role.PREFILL)
    assert ledger.get("a") is not None, "a lease still held keeps the entry"
    ledger.update("a", lambda e: e.leases.discard("lease-1"))
    assert ledger.get("a") is None


class _Handle:
    def __init__(self, name: str) -> None:
        self.name = name


def test_directory_routes_by_role_and_phase_least_loaded_first():
    directory = PoolDirectory()
    for name, roles in (("w1", "p"), ("w2", "pd"), ("w3", "d")):
        r = parse_roles(roles)
        directory.put(WorkerEntry(name, _Handle(name), r, WorkerPhase.ACTIVE, r))
    directory.outstanding.update({"w1": 3, "w2": 1})
    assert [e.name for e in directory.candidates(Role.PREFILL)] == ["w2", "w1"]
    version = directory.version
    directory.update("w2", routing=parse_roles("d"), phase=WorkerPhase.DRAINING)  # switching away from P
    assert directory.version > version
    assert [e.name for e in directory.candidates(Role.PREFILL)] == ["w1"]
    assert {e.name for e in directory.candidates(Role.DECODE)} == {"w2", "w3"}
    assert directory.mark_failed("w3") and not directory.mark_failed("w3")
    assert [e.name for e in directory.candidates(Role.DECODE)] == ["w2"]
    assert not directory.serving(Role.ENCODE)
