"""The policy: from an observation, the role switches, adds, removes and admission limits worth
making now. No I/O; the live loop and the simulator call the same `Policy.decide`.

It acts when the SLO is being missed (measured) or about to be (predicted for the measured load),
and only on a move whose predicted gain over `horizon_s` outweighs what the move costs while it
happens (the moved worker's capacity, lost for its drain and resize). Hysteresis (`min_gain`), a
cooldown after every action, and a settle time per worker (no second switch of a worker before the
window holds only evidence gathered after its first) keep a stationary load from flapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from serving.controller.actions import Action, ActionKind
from serving.controller.model import Prediction, StageCosts, backlog, predict
from serving.controller.observation import Kind, Observation, WorkerView
from serving.types import Role, Roles, WorkerPhase, parse_roles, roles_label

TOPOLOGY_ROLE_SETS: dict[str, tuple[str, ...]] = {
    "e+p+d": ("e", "p", "d"),
    "ep+d": ("ep", "d"),
    "e+pd": ("e", "pd"),
    "epd": ("epd",),
}


def role_sets(topology: str) -> tuple[Roles, ...]:
    """The role sets a worker may hold in `topology` (what a switch may move it between)."""
    return tuple(parse_roles(r) for r in TOPOLOGY_ROLE_SETS[topology])


@dataclass(frozen=True)
class PolicyConfig:
    role_sets: tuple[Roles, ...] = field(default_factory=lambda: role_sets("e+p+d"))
    min_per_role: int = 1  # never below this many workers holding a role the load needs
    max_per_role: int = 1_000_000
    max_workers: int = 0  # adds allowed up to this many workers (0: no adds)
    min_workers: int = 0  # removes allowed down to this many (0: no removes)
    cooldown_s: float = 10.0  # after any action
    settle_s: float = 20.0  # before the same worker is moved again (≥ the observation window)
    horizon_s: float = 60.0  # how long a gain is counted for against a move's cost
    min_gain: float = 0.05  # predicted attainment gain a move must bring (hysteresis)
    min_requests: int = 8  # evidence: finished requests in the window before acting
    slack: float = 0.05  # a remove must leave predicted attainment ≥ target + slack
    manage_admission: bool = False
    max_move_fraction: float = 0.25  # most of the pool one decision may move at once
    fixed: Roles = frozenset()  # roles no move may give or take (a fixed pool, e.g. encode)
    reverse_hold_s: float = 120.0  # no move undoing a recent one (X→Y then Y→X) within this
    hold_s: float = 60.0  # after a move that did not deliver, no moves while the load looks the same
    fallback_margin: float = 0.1  # measured attainment this far below target lets attribution act
    worker_cost: float = 5.0  # requests' worth of goodput an added worker must win over the horizon


@dataclass
class _Candidate:
    actions: list[Action]
    pool: list[Roles]
    prediction: Prediction
    cost: float  # requests expected to miss the SLO because of the move itself


@dataclass(frozen=True)
class _Check:
    at: float
    measured: float  # attainment measured when the move was decided
    predicted_before: float
    predicted_after: float


def _mix(obs: Observation) -> tuple[float, float]:
    """What the load looks like: its rate and the share of image requests."""
    rate = obs.rate
    return rate, obs.load(Kind.IMAGE).rate / rate if rate else 0.0


def _similar(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return abs(a[0] - b[0]) <= 0.3 * max(b[0], 1e-9) and abs(a[1] - b[1]) <= 0.15


class Policy:
    def __init__(self, cfg: PolicyConfig, costs: StageCosts) -> None:
        self.cfg, self.costs = cfg, costs
        self.last_action_at = -1e18
        self.moved_at: dict[str, float] = {}  # worker → when the policy last moved it
        self.admission_limit: int | None = None
        self.recent: list[tuple[float, Roles, Roles]] = []  # (when, from, to) of recent switches
        self._check: _Check | None = None  # a move whose effect is still to be judged
        self.hold_until = -1e18  # moves did not deliver: hold while the load looks the same
        self._hold_mix: tuple[float, float] = (0.0, 0.0)
        self._backlog: dict[Role, float] = {}

    def decide(self, obs: Observation, now: float, applied: bool = True) -> list[Action]:
        """The actions worth taking now. `applied=False` (advisory): they will not be carried out, so
        only the cooldown is kept — no worker counts as moved and no move is judged or guarded."""
        cfg = self.cfg
        evidence = max(obs.requests, round(obs.rate * obs.window_s))  # finished, or at least arrived
        if evidence < cfg.min_requests or now - self.last_action_at < cfg.cooldown_s:
            return []
        self._judge_last_move(obs, now)
        if now < self.hold_until and _similar(_mix(obs), self._hold_mix):
            return []
        live = [w for w in obs.workers if w.phase not in (WorkerPhase.STOPPED, WorkerPhase.FAILED)]
        active = [w for w in live if w.phase is WorkerPhase.ACTIVE]
        settled = len(active) == len(live)  # no move, start or replacement under way
        costs = self.costs.calibrated(obs)
        self._backlog = backlog(obs, costs)
        # Plan with the pool as it will be once the moves under way are done.
        pool = [w.planned for w in live if w.planned]
        base = predict(pool, obs.loads, costs, obs.slo, self._backlog)
        target = obs.slo.attainment
        # While a move is under way the measured misses are partly its own cost: judge by the model.
        missing = base.attainment < target or (settled and obs.attainment < target)
        actions: list[Action] = []
        if missing:
            best = self._best_move(obs, active, pool, base, costs, settled)
            if best is not None:
                actions.extend(best.actions)
        elif settled and cfg.min_workers and len(active) > cfg.min_workers:
            shrink = self._best_remove(obs, active, pool, base, costs)
            if shrink is not None:
                actions.extend(shrink.actions)
        if cfg.manage_admission and (limit := self._admission(obs, pool, costs)) is not None:
            actions.append(limit)
        if actions:
            self.last_action_at = now
        if not applied:
            return actions
        for a in actions:
            if a.worker:
                self.moved_at[a.worker] = now
            if a.kind is ActionKind.SWITCH and a.worker and a.roles:
                src = next(w.routing for w in active if w.name == a.worker)
                self.recent.append((now, src, a.roles))
        moves = [a for a in actions if a.kind is not ActionKind.ADMISSION]
        if moves:
            self._check = _Check(now, obs.attainment, moves[0].predicted_before, moves[0].predicted_after)
        self.recent = [m for m in self.recent if now - m[0] < cfg.reverse_hold_s]
        return actions

    def _judge_last_move(self, obs: Observation, now: float) -> None:
        """Once requests that arrived after the last move (and its settling) have finished: did they
        get at least half the gain the model promised? If not, the model does not describe this
        deployment (the bottleneck is outside the pools, e.g. CPUs every process shares): hold until
        the load changes rather than keep moving workers. Requests that arrived before the move are
        not evidence: a backlog built before it drains after it."""
        check = self._check
        if check is None or now - check.at < self.cfg.settle_s:
            return
        after = [met for arrival, met in obs.outcomes if arrival >= check.at + self.cfg.settle_s / 2]
        if len(after) < self.cfg.min_requests and now - check.at < 4 * self.cfg.settle_s:
            return  # not enough new evidence yet
        self._check = None
        measured = sum(after) / len(after) if after else 0.0
        promised = check.predicted_after - check.predicted_before
        if measured < obs.slo.attainment and measured - check.measured < 0.5 * promised:
            self.hold_until = now + self.cfg.hold_s
            self._hold_mix = _mix(obs)

    def _restores(self, pool: Sequence[Roles], dst: Roles) -> bool:
        return any(not any(r in roles for roles in pool) for r in dst)

    def _reverses(self, src: Roles, dst: Roles, now: float) -> bool:
        return any(a == dst and b == src and now - t < self.cfg.reverse_hold_s for t, a, b in self.recent)

    # -- candidates ---------------------------------------------------------------------------------

    def _needed(self, obs: Observation) -> set[Role]:
        """Roles the topology serves: each keeps a worker even while its load is away (images may come
        back at any moment, and a request with no worker for a stage waits or fails)."""
        return {r for roles in self.cfg.role_sets for r in roles} | {Role.PREFILL, Role.DECODE}

    def _allowed(self, obs: Observation, pool: Sequence[Roles]) -> bool:
        counts = {r: sum(1 for roles in pool if r in roles) for r in Role}
        floor = all(counts[r] >= self.cfg.min_per_role for r in self._needed(obs))
        return floor and all(counts[r] <= self.cfg.max_per_role for r in Role)

    def _movable(self, w: WorkerView, now: float) -> bool:
        """Not moved by the policy within `settle_s` of its move ending (`since`: its last phase
        change), so the window holds evidence of its new roles before it is judged again."""
        moved = self.moved_at.get(w.name)
        return moved is None or now - max(moved, w.since) >= self.cfg.settle_s

    def _best_move(
        self,
        obs: Observation,
        active: list[WorkerView],
        pool: list[Roles],
        base: Prediction,
        costs: StageCosts,
        settled: bool,
    ) -> _Candidate | None:
        """The best switch (of one or several interchangeable workers) or add. Workers holding the
        same roles are interchangeable for the model, so candidates are (from, to, how many): the
        ones moved are those with the least work to drain."""
        cfg = self.cfg
        groups: dict[Roles, list[WorkerView]] = {}
        for w in sorted(active, key=lambda w: (w.in_flight, w.name)):
            if self._movable(w, obs.now):
                groups.setdefault(w.routing, []).append(w)
        most = max(1, int(cfg.max_move_fraction * len(pool)))
        candidates: list[_Candidate] = []
        for src, members in groups.items():
            for dst in cfg.role_sets:
                if dst == src or (src | dst) & cfg.fixed:
                    continue
                # Undoing a recent move is refused, unless it restores a role left with no worker.
                if self._reverses(src, dst, obs.now) and not self._restores(pool, dst):
                    continue
                for m in _counts(min(most, len(members))):
                    without = _minus(pool, src, m)
                    new = without + [dst] * m
                    if not self._allowed(obs, new):
                        break
                    pred = predict(new, obs.loads, costs, obs.slo, self._backlog)
                    lost = predict(without, obs.loads, costs, obs.slo, self._backlog)
                    moved = members[:m]
                    busy_s = max(self._drain_estimate(obs, w, dst, costs) for w in moved) + costs.switch_s
                    cost = max(base.goodput - lost.goodput, 0.0) * busy_s
                    names = ", ".join(w.name for w in moved)
                    move = f"move {names} {roles_label(src)}→{roles_label(dst)}"
                    why = self._why(obs, base, pred, move)
                    actions = [
                        Action(ActionKind.SWITCH, why, w.name, dst, None, base.attainment, pred.attainment)
                        for w in moved
                    ]
                    candidates.append(_Candidate(actions, new, pred, cost))
        room = (cfg.max_workers - len(pool)) if cfg.max_workers else 0  # starting ones count too
        for dst in cfg.role_sets if room > 0 else ():
            if dst & cfg.fixed:
                continue
            for m in _counts(min(most, room)):
                new = pool + [dst] * m
                if not self._allowed(obs, new):
                    break
                pred = predict(new, obs.loads, costs, obs.slo, self._backlog)
                why = self._why(obs, base, pred, f"add {m} {roles_label(dst)} worker(s)")
                actions = [Action(ActionKind.ADD, why, None, dst, None, base.attainment, pred.attainment)] * m
                # A new worker costs nothing while it starts, but a switch reuses a warm one and a
                # worker is money: an add must beat the best switch by what it costs to run.
                candidates.append(_Candidate(actions, new, pred, cost=cfg.worker_cost * m))
        worth = [
            c
            for c in candidates
            if c.prediction.attainment - base.attainment >= cfg.min_gain
            and (c.prediction.goodput - base.goodput) * cfg.horizon_s > c.cost
        ]
        if worth:
            return max(worth, key=lambda c: (c.prediction.goodput - base.goodput) * cfg.horizon_s - c.cost)
        fresh = obs.now - self.last_action_at >= cfg.settle_s  # the window shows no earlier move
        return self._attributed(obs, candidates, base) if settled and fresh else None

    def _attributed(
        self, obs: Observation, candidates: list[_Candidate], base: Prediction
    ) -> _Candidate | None:
        """When the SLO is measured missed but the model sees no gain (its costs lag the change), move
        one worker towards the stage that owns the misses, if that stage shows a real queue and the
        model does not predict a loss."""
        if obs.attainment >= obs.slo.attainment - self.cfg.fallback_margin:
            return None  # a near miss is noise until the model sees it too
        if obs.attainment_tpot < obs.attainment_ttft:
            owner = Role.DECODE
        else:
            owner = obs.ttft.owner()
            stage = obs.stage(owner)
            if stage.service_p50_s is None or stage.wait_p50_s < stage.service_p50_s:
                return None  # no standing queue at the owner: more workers there would not help
        fits = [
            c
            for c in candidates
            if len(c.actions) == 1
            and c.actions[0].kind is ActionKind.SWITCH
            and owner in (c.actions[0].roles or frozenset())
            and c.prediction.attainment >= base.attainment
        ]
        if not fits:
            return None
        best = max(fits, key=lambda c: c.prediction.goodput - c.cost / self.cfg.horizon_s)
        a = best.actions[0]
        why = f"measured misses owned by {owner.name.lower()} (model sees no gain yet); " + a.reason
        best.actions = [Action(a.kind, why, a.worker, a.roles, None, a.predicted_before, a.predicted_after)]
        return best

    def _best_remove(
        self,
        obs: Observation,
        active: list[WorkerView],
        pool: list[Roles],
        base: Prediction,
        costs: StageCosts,
    ) -> _Candidate | None:
        best: _Candidate | None = None
        seen: set[Roles] = set()
        for w in sorted(active, key=lambda w: (w.in_flight, w.name)):
            without = _minus(pool, w.routing, 1)
            if w.routing in seen or not self._movable(w, obs.now) or not self._allowed(obs, without):
                continue
            seen.add(w.routing)  # the least-loaded of interchangeable workers stands for them all
            pred = predict(without, obs.loads, costs, obs.slo, self._backlog)
            if pred.attainment < obs.slo.attainment + self.cfg.slack:
                continue
            if best is None or pred.attainment > best.prediction.attainment:
                why = (
                    f"SLO met ({obs.attainment:.0%} measured); without {w.name} predicted "
                    f"{pred.attainment:.0%} ≥ target {obs.slo.attainment:.0%} + slack"
                )
                action = Action(ActionKind.REMOVE, why, w.name, None, None, base.attainment, pred.attainment)
                best = _Candidate([action], without, pred, 0.0)
        return best

    def _admission(self, obs: Observation, pool: list[Roles], costs: StageCosts) -> Action | None:
        """The most sequences the decode pool can run within the TPOT target: beyond it every
        request misses, so queueing at the gateway is the better failure."""
        decoders = sum(1 for roles in pool if Role.DECODE in roles)
        if costs.decode_per_seq_s <= 0 or decoders == 0:
            return None
        per_worker = 1 + (obs.slo.tpot_s - costs.decode_base_s) / costs.decode_per_seq_s
        limit = max(int(per_worker) * decoders, decoders)
        if self.admission_limit and abs(limit - self.admission_limit) <= 0.2 * self.admission_limit:
            return None
        self.admission_limit = limit
        why = (
            f"{decoders} decode worker(s) hold TPOT ≤ {obs.slo.tpot_s * 1000:.0f} ms up to {limit} sequences"
        )
        return Action(ActionKind.ADMISSION, why, limit=limit)

    # -- helpers ----------------------------------------------------------------------------------------

    def _drain_estimate(self, obs: Observation, w: WorkerView, roles: Roles, costs: StageCosts) -> float:
        """Seconds until `w` holds nothing of the roles it gives up."""
        dropped = w.routing - roles
        est = 0.0
        if Role.DECODE in dropped:
            tokens = max((k.output_tokens for k in obs.loads.values()), default=0.0)
            est = max(est, tokens * (obs.stage(Role.DECODE).service_mean_s or costs.step(max(w.decoding, 1))))
        if Role.PREFILL in dropped:
            est = max(est, costs.prefill(max((k.prompt_tokens for k in obs.loads.values()), default=0.0)))
        if Role.ENCODE in dropped:
            est = max(est, costs.encode(obs.load(Kind.IMAGE).image_tokens))
        return est

    @staticmethod
    def _why(obs: Observation, base: Prediction, pred: Prediction, move: str) -> str:
        miss = (
            f"TTFT met {obs.attainment_ttft:.0%}, TPOT met {obs.attainment_tpot:.0%} "
            f"(both {obs.attainment:.0%} < {obs.slo.attainment:.0%})"
            if obs.attainment < obs.slo.attainment
            else f"predicted attainment {base.attainment:.0%} < {obs.slo.attainment:.0%}"
        )
        owner = "decode" if obs.attainment_tpot < obs.attainment_ttft else obs.ttft.owner().name.lower()
        util = ", ".join(f"{r.value}={u:.2f}" for r, u in pred.utilisation.items())
        return (
            f"{miss}; {owner} owns the misses; {move}: predicted {base.attainment:.0%}→{pred.attainment:.0%} "
            f"(utilisation after: {util})"
        )


def _counts(most: int) -> list[int]:
    """How many interchangeable workers a candidate moves: 1, 2, 4, ... up to `most`."""
    out, m = [], 1
    while m <= most:
        out.append(m)
        m *= 2
    if out and out[-1] != most and most > 0:
        out.append(most)
    return out


def _minus(pool: list[Roles], roles: Roles, m: int) -> list[Roles]:
    """`pool` less `m` workers holding exactly `roles`."""
    out, left = [], m
    for r in pool:
        if left and r == roles:
            left -= 1
            continue
        out.append(r)
    return out
