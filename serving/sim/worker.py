"""One simulated worker: its encode and prefill queues, its continuous-batching decode batch, and what
its current step works on; and a request's path through the stages."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serving.sim.workload import SimRequest
from serving.types import Role, Roles, WorkerPhase

E, P, D = Role.ENCODE, Role.PREFILL, Role.DECODE


@dataclass
class InFlight:
    r: SimRequest
    queued_at: float = 0.0
    first_token: float | None = None
    # Seconds per stage, named as `RequestRecord`'s fields (encode_queue_s, encode_s, e2p_s, ...).
    stages: dict[str, float] = field(default_factory=dict)


@dataclass
class SimWorker:
    name: str
    roles: Roles
    phase: WorkerPhase = WorkerPhase.ACTIVE
    routing: Roles = frozenset()
    since: float = 0.0
    target: Roles | None = None  # roles after a switch; None with `removing`: stop once drained
    removing: bool = False
    e_queue: deque[InFlight] = field(default_factory=deque)
    p_queue: deque[InFlight] = field(default_factory=deque)
    d_queue: deque[InFlight] = field(default_factory=deque)  # waiting for a decode slot
    running: list[tuple[int, int, InFlight]] = field(default_factory=list)  # heap of (finish step, seq, req)
    busy: bool = False
    step_no: int = 0
    step_decodes: bool = False
    busy_s: dict[Role, float] = field(default_factory=lambda: {E: 0.0, P: 0.0, D: 0.0})
    _current: dict[Role, bool] = field(default_factory=dict)  # what the step under way works on

    def holds(self, role: Role) -> bool:
        return bool({E: self.e_queue, P: self.p_queue, D: self.running or self.d_queue}[role]) or (
            self.busy and self._current.get(role, False)
        )

    @property
    def in_flight(self) -> int:
        return len(self.e_queue) + len(self.p_queue) + len(self.d_queue) + len(self.running) + int(self.busy)

    def load(self, role: Role) -> int:
        if role is D:
            return len(self.running) + len(self.d_queue)
        return len(self.e_queue if role is E else self.p_queue) + int(self.busy)
