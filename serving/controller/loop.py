"""The live controller: each tick, observe (the gateway's request window + the workers' stats from
the directory), decide (the pure policy), and — in `on` mode — act through the control plane's
actuator. `advisory` logs and exports what it would do and touches nothing. It runs on the control
plane's event loop; an actuation runs as a task of its own, so a slow drain never delays a tick."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from serving.control.records import ControllerSummary
from serving.controller.actions import Action, ActionKind, Decision
from serving.controller.model import Prediction, predict
from serving.controller.observation import Observation, Slo, WorkerView
from serving.controller.policy import Policy
from serving.controller.window import RequestWindow
from serving.types import Roles, WorkerPhase

if TYPE_CHECKING:
    from serving.control.plane import ControlPlane

log = logging.getLogger(__name__)
MODES = ("off", "advisory", "on")


@dataclass(frozen=True)
class LoopConfig:
    mode: str = "off"
    tick_s: float = 2.0
    window_s: float = 20.0


class ControllerLoop:
    def __init__(
        self,
        plane: ControlPlane,
        window: RequestWindow,
        policy: Policy,
        slo: Slo,
        cfg: LoopConfig,
        set_admission: Callable[[int], None] | None = None,
    ) -> None:
        if cfg.mode not in MODES:
            raise ValueError(f"controller mode must be one of {MODES}")
        self.plane, self.window, self.policy, self.slo, self.cfg = plane, window, policy, slo, cfg
        self.set_admission = set_admission
        self.decisions: deque[Decision] = deque(maxlen=500)
        self.counts: dict[tuple[str, str, bool], int] = {}
        self.last: Observation | None = None
        self.predicted: Prediction | None = None
        self._moving: dict[str, Roles] = {}  # worker → roles of a switch the controller has under way
        self._tasks: set[asyncio.Task] = set()

    # -- the loop -------------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.tick_s)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - logged; one bad tick must not end the controller
                log.exception("controller tick failed")

    def observe(self, now: float | None = None) -> Observation:
        now = time.perf_counter() if now is None else now
        return self.window.observe(self.views(), now, self.cfg.window_s, self.slo)

    def views(self) -> list[WorkerView]:
        wall, now = time.time(), time.perf_counter()
        out = []
        for e in self.plane.directory.entries():
            s = e.stats
            out.append(
                WorkerView(
                    name=e.name,
                    roles=e.roles,
                    phase=e.phase,
                    routing=e.routing,
                    in_flight=s.requests_in_flight if s else 0,
                    decoding=s.num_running if s else 0,
                    kv_usage=s.kv_blocks_used / s.kv_blocks_total if s and s.kv_blocks_total else 0.0,
                    since=e.since - wall + now,  # the directory's wall clock on the policy's clock
                    target=self._moving.get(e.name),
                )
            )
        return out

    def tick(self, now: float | None = None) -> list[Decision]:
        """One observe → decide → act round; returns the decisions it made."""
        now = time.perf_counter() if now is None else now
        obs = self.observe(now)
        self.last = obs
        pool = [w.planned for w in obs.workers if w.phase not in (WorkerPhase.STOPPED, WorkerPhase.FAILED)]
        self.predicted = predict(
            [r for r in pool if r], obs.loads, self.policy.costs.calibrated(obs), obs.slo
        )
        made = []
        for action in self.policy.decide(obs, now, applied=self.cfg.mode == "on"):
            log.info("controller (%s): %s", self.cfg.mode, action.describe())
            if self.cfg.mode == "on":
                decision = Decision(time.time(), action, "on", False, "started")
                self.decisions.append(decision)
                self._start(decision)  # counted once its outcome is known (the counter never drops)
            else:
                decision = Decision(time.time(), action, "advisory", False, "advisory")
                self.decisions.append(decision)
                self._count(decision)
            made.append(decision)
        return made

    def _count(self, decision: Decision) -> None:
        key = (decision.action.kind.value, decision.mode, decision.applied)
        self.counts[key] = self.counts.get(key, 0) + 1

    async def stop(self) -> None:
        """Cancel the actions under way (before the plane stops its workers: no add after that)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- acting ---------------------------------------------------------------------------------------

    def _start(self, decision: Decision) -> None:
        action = decision.action
        if action.kind is ActionKind.SWITCH and action.worker and action.roles:
            self._moving[action.worker] = action.roles
        task = asyncio.get_running_loop().create_task(self._act(action))
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, decision))

    async def _act(self, action: Action) -> None:
        actuator = self.plane.actuator
        if action.kind is ActionKind.SWITCH and action.worker and action.roles:
            await actuator.switch(action.worker, action.roles)
        elif action.kind is ActionKind.ADD and action.roles:
            await actuator.add(action.roles)
        elif action.kind is ActionKind.REMOVE and action.worker:
            await actuator.remove(action.worker)
        elif action.kind is ActionKind.ADMISSION and action.limit is not None:
            if self.set_admission is None:
                raise RuntimeError("this gateway does not take admission limits")
            self.set_admission(action.limit)

    def _done(self, task: asyncio.Task, decision: Decision) -> None:
        action = decision.action
        self._tasks.discard(task)
        if action.worker:
            self._moving.pop(action.worker, None)
        if task.cancelled():
            outcome = "cancelled"
        elif (exc := task.exception()) is not None:
            outcome = f"failed: {type(exc).__name__}: {exc}"
            log.warning("controller action %s failed: %r", action.describe(), exc)
        else:
            outcome = "done"
        final = replace(decision, outcome=outcome, applied=outcome == "done")
        self._count(final)
        for i, d in enumerate(self.decisions):
            if d is decision:
                self.decisions[i] = final
                break

    def summary(self) -> ControllerSummary:
        """What the controller's metrics export."""
        obs, pred = self.last, self.predicted
        return ControllerSummary(
            mode=self.cfg.mode,
            counts=dict(self.counts),
            observed_attainment=obs.attainment if obs else None,
            observed_goodput=obs.goodput if obs else None,
            predicted_attainment=pred.attainment if pred else None,
        )

    def snapshot(self) -> dict[str, object]:
        """What `epd ctl decisions` and `/admin/decisions` show."""
        obs, pred = self.last, self.predicted
        return {
            "mode": self.cfg.mode,
            "tick_s": self.cfg.tick_s,
            "window_s": self.cfg.window_s,
            "slo": {"ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s, "attainment": self.slo.attainment},
            "observed": None
            if obs is None
            else {
                "requests": obs.requests,
                "rate": round(obs.rate, 3),
                "attainment": round(obs.attainment, 4),
                "attainment_ttft": round(obs.attainment_ttft, 4),
                "attainment_tpot": round(obs.attainment_tpot, 4),
                "goodput": round(obs.goodput, 3),
                "ttft_breakdown_s": {k: round(v, 4) for k, v in vars(obs.ttft).items()},
            },
            "predicted_attainment": None if pred is None else round(pred.attainment, 4),
            # A copy first: the control loop appends and replaces while a front end reads.
            "decisions": [d.as_dict() for d in list(self.decisions)],
        }
