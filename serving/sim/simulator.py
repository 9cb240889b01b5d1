"""The discrete-event simulator: workers with E/P queues and a continuous-batching decode loop,
transfers between stages, routing to the least-loaded worker, and role switches, adds and removes
with their drain and resize costs. The live policy runs on its clock, fed the same observations.

One worker runs one step at a time: an encode (one request) or a prefill (one request), plus one
decode step over its running batch — as the engine loop does. A request decoding on a worker that
joins mid-step starts with the next step. Pools over 16 workers route by the best of two random
picks (what a directory of thousands would do) instead of a full scan.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from serving.controller.actions import Action, ActionKind, Decision
from serving.controller.model import StageCosts
from serving.controller.observation import RequestRecord, Slo, WorkerView
from serving.controller.policy import Policy
from serving.controller.window import RequestWindow
from serving.sim.worker import InFlight, SimWorker
from serving.sim.workload import SimRequest
from serving.types import Role, Roles, WorkerPhase, roles_label

E, P, D = Role.ENCODE, Role.PREFILL, Role.DECODE


@dataclass(frozen=True)
class SimConfig:
    costs: StageCosts
    slo: Slo
    tick_s: float = 2.0
    window_s: float = 20.0
    seed: int = 0
    # CPUs the workers share (None: each worker computes on its own device). With fewer cores than
    # busy workers, a step stretches by busy / cores (processor sharing, fixed at the step's start).
    cores: float | None = None


@dataclass
class SimResult:
    records: list[RequestRecord]
    decisions: list[Decision]
    duration_s: float
    in_system_area: float  # ∫ requests in the system dt (Little's law: = Σ sojourn times)
    busy_s: dict[Role, float]
    worker_seconds: dict[Role, float]  # ∫ workers holding each role dt
    events: int
    timeline: list[tuple[float, dict[str, int]]]  # (time, role set → workers) at each change
    queue_area: dict[Role, float]  # ∫ requests queued at E and P dt (Little's law per queue)

    def utilisation(self) -> dict[Role, float]:
        return {r: self.busy_s[r] / self.worker_seconds[r] if self.worker_seconds[r] else 0.0 for r in Role}


class Simulator:
    def __init__(
        self,
        cfg: SimConfig,
        pool: Sequence[Roles],
        policy: Policy | None = None,
        mode: str = "on",
    ) -> None:
        self.cfg, self.costs, self.policy, self.mode = cfg, cfg.costs, policy, mode
        self.rng = random.Random(cfg.seed)
        self.now = 0.0
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self.workers: dict[str, SimWorker] = {}
        self._names = itertools.count()
        for roles in pool:
            self._new_worker(roles, WorkerPhase.ACTIVE)
        self._routes: dict[Role, list[SimWorker]] | None = None
        self._pending: dict[Role, deque[InFlight]] = {E: deque(), P: deque(), D: deque()}
        self.window = RequestWindow(horizon_s=cfg.window_s * 2)
        self.records: list[RequestRecord] = []
        self.decisions: list[Decision] = []
        self._in_system = 0
        self._live: dict[int, InFlight] = {}
        self._busy = 0  # workers in a step now (for CPU sharing)
        self._queued = {E: 0, P: 0}
        self._queue_area = {E: 0.0, P: 0.0}
        self._area = 0.0
        self._last_t = 0.0
        self._held = {r: 0 for r in Role}
        self._worker_s = {r: 0.0 for r in Role}
        self.timeline: list[tuple[float, dict[str, int]]] = []
        self._note_pool()
        self.events = 0

    # -- the event loop -------------------------------------------------------------------------------

    def run(self, requests: Sequence[SimRequest], until: float | None = None) -> SimResult:
        for req in requests:
            self._at(req.arrival, _ARRIVE, req)
        end = until if until is not None else (max((r.arrival for r in requests), default=0.0) + 600.0)
        if self.policy is not None:
            self._at(self.cfg.tick_s, _TICK, None)
        left = len(requests)
        while self._events:
            t, _, kind, payload = heapq.heappop(self._events)
            if t > end:
                break
            self._advance(t)
            self.events += 1
            if kind == _ARRIVE:
                self._arrive(payload)  # type: ignore[arg-type]
            elif kind == _STEP:
                left -= self._step_done(payload)  # type: ignore[arg-type]
            elif kind == _TO_P:
                self._route(P, payload)  # type: ignore[arg-type]
            elif kind == _TO_D:
                self._route(D, payload)  # type: ignore[arg-type]
            elif kind == _READY:
                self._ready(payload)  # type: ignore[arg-type]
            elif kind == _TICK and left > 0:
                self._tick()
                self._at(self.now + self.cfg.tick_s, _TICK, None)
        # Requests still in the system when the run ends failed: they count against attainment.
        unfinished = [self._record(req, ok=False) for req in self._live.values()]
        busy = {r: sum(w.busy_s[r] for w in self.workers.values()) for r in Role}
        return SimResult(
            self.records + unfinished,
            self.decisions,
            self.now,
            self._area,
            busy,
            dict(self._worker_s),
            self.events,
            self.timeline,
            dict(self._queue_area),
        )

    def _at(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._events, (t, next(self._seq), kind, payload))

    def _advance(self, t: float) -> None:
        dt = t - self._last_t
        self._area += self._in_system * dt
        for q in (E, P):
            self._queue_area[q] += self._queued[q] * dt
        for r in Role:
            self._worker_s[r] += self._held[r] * dt
        self._last_t = self.now = t

    # -- requests ---------------------------------------------------------------------------------------

    def _arrive(self, r: SimRequest) -> None:
        self._in_system += 1
        self.window.arrive(self.now, r.kind)
        req = InFlight(r)
        self._live[r.index] = req
        self._route(E if r.image_tokens else P, req)

    def _route(self, role: Role, req: InFlight) -> None:
        w = self._pick(role)
        if w is None:
            self._pending[role].append(req)
            return
        req.queued_at = self.now
        if role is D:
            self._join_decode(w, req)
        else:
            (w.e_queue if role is E else w.p_queue).append(req)
            self._queued[role] += 1
        self._kick(w)

    def _pick(self, role: Role) -> SimWorker | None:
        if self._routes is None:
            self._routes = {
                r: [w for w in self.workers.values() if r in w.routing and w.phase is not WorkerPhase.STOPPED]
                for r in Role
            }
        found = self._routes[role]
        if not found:
            return None
        if len(found) <= 16:
            return min(found, key=lambda w: w.load(role))
        a, b = self.rng.choice(found), self.rng.choice(found)
        return a if a.load(role) <= b.load(role) else b

    def _join_decode(self, w: SimWorker, req: InFlight) -> None:
        if len(w.running) >= self.costs.max_decode_batch:
            w.d_queue.append(req)
            return
        steps = req.r.output_tokens - 1
        first = w.step_no + (1 if w.busy and w.step_decodes else 0)
        heapq.heappush(w.running, (first + steps, next(self._seq), req))

    def _kick(self, w: SimWorker) -> None:
        """Start the worker's next step if it is idle and has work."""
        if w.busy or w.phase is WorkerPhase.STOPPED or w.phase is WorkerPhase.STARTING:
            return
        c, t = self.costs, 0.0
        current: dict[Role, object] = {}
        role = E if w.e_queue else P if w.p_queue else None  # one encode or one prefill a step
        if role is not None:
            req = (w.e_queue if role is E else w.p_queue).popleft()
            self._queued[role] -= 1
            service = c.encode(req.r.image_tokens) if role is E else c.prefill(req.r.prompt_tokens)
            stage = "encode" if role is E else "prefill"
            req.stages[f"{stage}_queue_s"] = self.now - req.queued_at
            req.stages[f"{stage}_s"] = service
            t += service
            w.busy_s[role] += service
            current[role] = req
        if w.running:
            step = c.step(len(w.running))
            w.busy_s[D] += step
            t += step
        if not current and not w.running:  # idle (a step of zero cost still runs)
            return
        if self.cfg.cores:
            self._busy += 1
            t *= max(1.0, self._busy / self.cfg.cores)
        w.busy, w.step_decodes = True, bool(w.running)
        w._current = {E: E in current, P: P in current, D: bool(w.running)}
        self._at(self.now + t, _STEP, (w, current.get(E), current.get(P)))

    def _step_done(self, payload: tuple[SimWorker, InFlight | None, InFlight | None]) -> int:
        w, enc, pre = payload
        finished = 0
        if w.step_decodes:
            w.step_no += 1
            while w.running and w.running[0][0] <= w.step_no:
                _, _, req = heapq.heappop(w.running)
                finished += self._finish(req)
        # The step is over before anyone joins: a request promoted now starts with the next step.
        decoded, w.busy, w.step_decodes, w._current = w.step_decodes, False, False, {}
        if self.cfg.cores:
            self._busy -= 1
        if decoded:
            while w.d_queue and len(w.running) < self.costs.max_decode_batch:
                self._join_decode(w, w.d_queue.popleft())
        if enc is not None:
            enc.stages["e2p_s"] = self.costs.e2p_s
            self._at(self.now + self.costs.e2p_s, _TO_P, enc)
        if pre is not None:
            pre.first_token = self.now
            if pre.r.output_tokens <= 1:
                finished += self._finish(pre)
            elif D in w.routing and D in w.roles:
                pre.stages["p2d_s"] = 0.0
                self._join_decode(w, pre)
            else:
                pre.stages["p2d_s"] = self.costs.p2d_s
                self._at(self.now + self.costs.p2d_s, _TO_D, pre)
        self._drained(w)
        self._kick(w)
        return finished

    def _finish(self, req: InFlight) -> int:
        self._in_system -= 1
        self._live.pop(req.r.index, None)
        record = self._record(req, ok=True)
        self.records.append(record)
        self.window.add(record)
        return 1

    def _record(self, req: InFlight, ok: bool) -> RequestRecord:
        r = req.r
        return RequestRecord.finished(
            r.arrival,
            req.first_token,
            self.now,
            r.kind,
            (r.prompt_tokens, r.image_tokens, r.output_tokens),
            ok,
            **req.stages,
        )

    # -- role changes -----------------------------------------------------------------------------------

    def _new_worker(self, roles: Roles, phase: WorkerPhase) -> SimWorker:
        name = f"w{next(self._names)}"
        w = SimWorker(name, roles, phase, roles if phase is WorkerPhase.ACTIVE else frozenset(), self.now)
        self.workers[name] = w
        return w

    def apply(self, action: Action) -> str:
        """Carry out one action; returns the outcome ("done" or why not)."""
        if action.kind is ActionKind.ADD and action.roles:
            w = self._new_worker(action.roles, WorkerPhase.STARTING)
            w.target = action.roles
            self._at(self.now + self.costs.start_s, _READY, w)
            self._changed()
            return "done"
        if action.kind is ActionKind.ADMISSION:
            return "not simulated"
        w = self.workers.get(action.worker or "")
        if w is None or w.phase is not WorkerPhase.ACTIVE:
            return "worker not active"
        if action.kind is ActionKind.REMOVE:
            w.removing, w.target, w.routing = True, None, frozenset()
        else:
            w.target = action.roles or w.roles
            w.routing = w.roles & w.target
        w.phase, w.since = WorkerPhase.DRAINING, self.now
        self._changed()
        self._drained(w)
        return "done"

    def _drained(self, w: SimWorker) -> None:
        if w.phase is not WorkerPhase.DRAINING:
            return
        dropped = w.roles - (w.target or frozenset())
        if any(w.holds(r) for r in dropped):
            return
        if w.removing:
            w.phase, w.roles, w.routing, w.since = WorkerPhase.STOPPED, frozenset(), frozenset(), self.now
            self._changed()
            return
        w.phase, w.since = WorkerPhase.RECONFIGURING, self.now
        self._at(self.now + self.costs.switch_s, _READY, w)

    def _ready(self, w: SimWorker) -> None:
        w.roles = w.routing = w.target or w.roles
        w.target, w.phase, w.since = None, WorkerPhase.ACTIVE, self.now
        self._changed()
        for role in Role:
            waiting, self._pending[role] = self._pending[role], deque()
            for req in waiting:
                self._route(role, req)
        self._kick(w)

    def _changed(self) -> None:
        self._routes = None
        self._note_pool()

    def _note_pool(self) -> None:
        live = [w for w in self.workers.values() if w.phase is not WorkerPhase.STOPPED]
        self._held = {r: sum(1 for w in live if r in w.roles) for r in Role}
        counts: dict[str, int] = {}
        for w in live:
            key = roles_label(w.target if w.target is not None else w.roles)
            counts[key] = counts.get(key, 0) + 1
        self.timeline.append((self.now, counts))

    # -- the controller -----------------------------------------------------------------------------------

    def views(self) -> list[WorkerView]:
        cap = self.costs.max_decode_batch
        return [
            WorkerView(
                w.name,
                w.roles,
                w.phase,
                w.routing,
                w.in_flight,
                len(w.running),
                len(w.running) / cap,
                w.since,
                target=w.target,
            )
            for w in self.workers.values()
            if w.phase is not WorkerPhase.STOPPED
        ]

    def _tick(self) -> None:
        assert self.policy is not None
        obs = self.window.observe(self.views(), self.now, self.cfg.window_s, self.cfg.slo)
        for action in self.policy.decide(obs, self.now, applied=self.mode == "on"):
            if self.mode == "on":
                outcome = self.apply(action)
                self.decisions.append(Decision(self.now, action, self.mode, outcome == "done", outcome))
            else:
                self.decisions.append(Decision(self.now, action, self.mode, False, "advisory"))


_ARRIVE, _STEP, _TO_P, _TO_D, _READY, _TICK = range(6)
