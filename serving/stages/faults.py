"""Injected faults, for the tests of failure containment: raise inside one stage whenever a batch
includes one chosen request, exactly where a bug or a hostile input would raise."""

from __future__ import annotations

import threading


class InjectedFault(RuntimeError):
    """Raised by an armed fault; never raised unless a test armed one."""


class FaultPlan:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: set[tuple[str, str]] = set()  # (stage, request id)

    def arm(self, stage: str, request_id: str) -> None:
        if stage not in ("encode", "prefill", "decode"):
            raise ValueError(f"unknown stage {stage!r}")
        with self._lock:
            self._armed.add((stage, request_id))

    def check(self, stage: str, request_ids: list[str]) -> None:
        """Called before a batch of `stage` runs; raises if it includes an armed request."""
        if not self._armed:
            return
        with self._lock:
            hit = [r for r in request_ids if (stage, r) in self._armed]
        if hit:
            raise InjectedFault(f"injected {stage} fault for {hit[0]}")
