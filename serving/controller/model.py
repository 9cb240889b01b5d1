"""The capacity model the policy plans with: per-stage service costs (fitted by `epd profile`,
re-scaled live to the service times the window measured) and a queueing approximation that predicts
TTFT / TPOT attainment and goodput of a pool of workers under a load. Pure arithmetic.

E and P are FIFO pools: M/D/c waits (Erlang C with the deterministic-service correction). D is
continuous batching: a step of b sequences takes a + c·(b − 1) seconds, and by Little's law
b = λ_d·(L − 1)·TPOT, which solves to b = λ_d·(L − 1)·(a − c) / (1 − λ_d·(L − 1)·c) (stable while the
denominator is positive). A worker holding several roles shares its time: prefill and encode steps
slow its decode, and its decode steps lengthen each prefill.

TTFT here is what the system streams: P sends the first token before the KV moves, so the P→D
transfer falls in the first inter-token gap (TPOT), not in TTFT.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from serving.controller.observation import Kind, KindLoad, Observation, Slo
from serving.types import Role, Roles

DRAIN_S = 30.0  # how soon a standing E/P backlog should be cleared
_TPOT_SPREAD = 0.2  # log-normal spread of per-request TPOT around the mean (measured: 0.1–0.3)


@dataclass(frozen=True)
class StageCosts:
    """Linear service-time fits of one engine on one machine (seconds)."""

    encode_base_s: float = 0.01
    encode_per_token_s: float = 1e-4  # per image token
    prefill_base_s: float = 0.01
    prefill_per_token_s: float = 1e-4  # per prompt token (image tokens included)
    decode_base_s: float = 0.01  # a decode step with one sequence ...
    decode_per_seq_s: float = 1e-3  # ... plus this per further sequence in the batch
    e2p_s: float = 0.002  # moving one request's embeddings E→P
    p2d_s: float = 0.002  # moving one request's KV P→D
    overhead_s: float = 0.0  # TTFT outside the stages (gateway, RPC hops): measured live
    switch_s: float = 0.5  # re-registering buffers after a drain
    start_s: float = 10.0  # starting a new worker (weights loaded)
    max_decode_batch: int = 64

    def encode(self, image_tokens: float) -> float:
        return self.encode_base_s + self.encode_per_token_s * image_tokens

    def prefill(self, prompt_tokens: float) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * prompt_tokens

    def step(self, batch: float) -> float:
        return self.decode_base_s + self.decode_per_seq_s * max(batch - 1.0, 0.0)

    @classmethod
    def load(cls, path: str | Path) -> StageCosts:
        data = json.loads(Path(path).read_text())
        return cls(**{k: v for k, v in data.get("costs", data).items() if k in cls.__dataclass_fields__})

    def calibrated(self, obs: Observation, min_samples: int = 5) -> StageCosts:
        """The same shapes, scaled so the load the window saw costs what the window measured."""
        costs = self
        enc, pre, dec = obs.stage(Role.ENCODE), obs.stage(Role.PREFILL), obs.stage(Role.DECODE)
        img = obs.load(Kind.IMAGE)
        if enc.samples >= min_samples and enc.service_mean_s and img.rate > 0:
            k = enc.service_mean_s / max(costs.encode(img.image_tokens), 1e-9)
            costs = replace(
                costs, encode_base_s=costs.encode_base_s * k, encode_per_token_s=costs.encode_per_token_s * k
            )
        if pre.samples >= min_samples and pre.service_mean_s and obs.rate > 0:
            k = pre.service_mean_s / max(costs.prefill(_mean_prompt(obs.loads)), 1e-9)
            costs = replace(
                costs,
                prefill_base_s=costs.prefill_base_s * k,
                prefill_per_token_s=costs.prefill_per_token_s * k,
            )
        decoders = [w for w in obs.workers if Role.DECODE in w.routing]
        if dec.samples >= min_samples and dec.service_mean_s and decoders:
            batch = max(dec.in_flight / len(decoders), 1.0)
            k = dec.service_mean_s / max(costs.step(batch), 1e-9)
            # Decode on a shared worker is slowed by its other roles: do not blame the step for it.
            if all(w.routing == frozenset({Role.DECODE}) for w in decoders):
                costs = replace(
                    costs, decode_base_s=costs.decode_base_s * k, decode_per_seq_s=costs.decode_per_seq_s * k
                )
        if obs.ttft.e2p_s > 0:
            costs = replace(costs, e2p_s=obs.ttft.e2p_s)
        if obs.ttft.p2d_s > 0:
            costs = replace(costs, p2d_s=obs.ttft.p2d_s)
        if obs.requests >= min_samples:
            costs = replace(costs, overhead_s=obs.ttft.other_s)
        return costs


def _mean_prompt(loads: dict[Kind, KindLoad]) -> float:
    rate = sum(k.rate for k in loads.values())
    return sum(k.rate * k.prompt_tokens for k in loads.values()) / rate if rate else 0.0


@dataclass(frozen=True)
class Prediction:
    attainment: float
    attainment_ttft: float
    attainment_tpot: float
    goodput: float  # requests per second meeting the SLO
    utilisation: dict[Role, float]  # offered work per worker holding the role (≥ 1: overloaded)
    tpot_s: float
    batch: float  # sequences per decode worker


def _erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with `offered` = λ·s Erlangs. Through the
    Erlang B recursion, which stays finite at thousands of servers (aᵏ/k! does not)."""
    if offered >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1 - rho * (1 - b))


@dataclass(frozen=True)
class _Wait:
    """A queue wait: 0 with probability 1 − p, else exponential with `rate`."""

    p: float
    rate: float

    def cdf(self, x: float) -> float:
        return 0.0 if x < 0 else 1.0 - self.p * math.exp(-self.rate * x)


def _pool_wait(servers: int, arrivals: float, service_s: float) -> _Wait | None:
    """M/D/c wait (Erlang C, the mean halved for deterministic service); None when overloaded."""
    if arrivals <= 0 or service_s <= 0:
        return _Wait(0.0, 1.0)  # no load, or work that takes no time: nobody waits
    if servers <= 0 or arrivals * service_s >= servers:
        return None
    p = _erlang_c(servers, arrivals * service_s)
    return _Wait(p, 2.0 * (servers / service_s - arrivals))


def _both_within(a: _Wait, b: _Wait, x: float) -> float:
    """P(Wa + Wb ≤ x) for independent waits."""
    if x < 0:
        return 0.0
    fa, fb = 1 - math.exp(-a.rate * x), 1 - math.exp(-b.rate * x)
    if abs(a.rate - b.rate) < 1e-9 * max(a.rate, b.rate):
        h = 1 - math.exp(-a.rate * x) * (1 + a.rate * x)
    else:
        h = 1 - (b.rate * math.exp(-a.rate * x) - a.rate * math.exp(-b.rate * x)) / (b.rate - a.rate)
    return (1 - a.p) * (1 - b.p) + (1 - a.p) * b.p * fb + a.p * (1 - b.p) * fa + a.p * b.p * h


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def predict(
    pool: Sequence[Roles],
    loads: dict[Kind, KindLoad],
    costs: StageCosts,
    slo: Slo,
    backlog: dict[Role, float] | None = None,
) -> Prediction:
    """Attainment and goodput of `pool` (one role set per worker) serving `loads` in steady state.
    `backlog`: requests queued at E and P beyond what the load keeps there; the pool must also clear
    them within `DRAIN_S`, which counts as that much more arrival rate (a pool that just keeps up with
    the load would leave a backlog built during a burst standing for minutes)."""
    img, txt = loads.get(Kind.IMAGE, KindLoad()), loads.get(Kind.TEXT, KindLoad())
    extra = {r: (backlog or {}).get(r, 0.0) / DRAIN_S for r in (Role.ENCODE, Role.PREFILL)}
    rate = img.rate + txt.rate
    counts = {r: sum(1 for roles in pool if r in roles) for r in Role}
    zero = Prediction(0.0, 0.0, 0.0, 0.0, {r: math.inf for r in Role}, math.inf, math.inf)
    if rate <= 0:
        return Prediction(1.0, 1.0, 1.0, 0.0, {r: 0.0 for r in Role}, costs.step(1), 0.0)
    if counts[Role.PREFILL] == 0 or counts[Role.DECODE] == 0 or (img.rate > 0 and counts[Role.ENCODE] == 0):
        return zero
    s_e = costs.encode(img.image_tokens) if img.rate > 0 else 0.0
    s_p = (img.rate * costs.prefill(img.prompt_tokens) + txt.rate * costs.prefill(txt.prompt_tokens)) / rate
    out_tokens = (img.rate * img.output_tokens + txt.rate * txt.output_tokens) / rate
    e_rate, p_rate = img.rate + extra[Role.ENCODE], rate + extra[Role.PREFILL]
    work = {Role.ENCODE: e_rate * s_e, Role.PREFILL: p_rate * s_p}  # worker-seconds per second

    def ep_share(roles: Roles) -> float:
        return sum(work[r] / counts[r] for r in (Role.ENCODE, Role.PREFILL) if r in roles)

    decoders = [roles for roles in pool if Role.DECODE in roles]
    ep_on_decoders = sum(ep_share(r) for r in decoders) / len(decoders)
    per_decoder = rate * max(out_tokens - 1, 0.0) / len(decoders)  # tokens per second per D worker
    # b = λ_d·TPOT(b), TPOT(b) = step(b) / (1 − the time E/P work takes): solved in closed form.
    free = 1 - ep_on_decoders
    load = per_decoder * costs.decode_per_seq_s  # what each extra sequence adds, per unit of time
    stable = free > 0 and load < free
    batch = (
        per_decoder * (costs.decode_base_s - costs.decode_per_seq_s) / (free - load) if stable else math.inf
    )
    batch = max(batch, 1.0 if per_decoder > 0 else 0.0)
    stable = stable and batch <= costs.max_decode_batch
    tpot = costs.step(batch) / free if stable else math.inf

    # A prefill or encode on a worker that also decodes waits for the running decode step.
    def slowed(role: Role, service: float) -> float:
        holders = [roles for roles in pool if role in roles]
        shared = sum(1 for roles in holders if Role.DECODE in roles) / len(holders)
        return service + shared * (costs.step(batch) if stable else costs.step(costs.max_decode_batch))

    utilisation = {
        Role.ENCODE: work[Role.ENCODE] / counts[Role.ENCODE] if counts[Role.ENCODE] else 0.0,
        Role.PREFILL: work[Role.PREFILL] / counts[Role.PREFILL],
        Role.DECODE: load / free if free > 0 else math.inf,  # share of decode capacity in use
    }
    p_tpot = (
        _phi(math.log(slo.tpot_s / tpot) / _TPOT_SPREAD)
        if stable and out_tokens > 1
        else (1.0 if stable else 0.0)
    )
    s_p_eff = slowed(Role.PREFILL, s_p)
    w_p = _pool_wait(counts[Role.PREFILL], p_rate, s_p_eff)
    p_ttft_text = p_ttft_img = 0.0
    if w_p is not None:
        budget = slo.ttft_s - costs.overhead_s
        p_ttft_text = w_p.cdf(budget - s_p_eff)
        if img.rate > 0:
            s_e_eff = slowed(Role.ENCODE, s_e)
            w_e = _pool_wait(counts[Role.ENCODE], e_rate, s_e_eff)
            if w_e is not None:
                p_ttft_img = _both_within(w_e, w_p, budget - s_e_eff - costs.e2p_s - s_p_eff)
    p_ttft = (img.rate * p_ttft_img + txt.rate * p_ttft_text) / rate
    attainment = p_ttft * p_tpot
    if not math.isfinite(attainment):
        return zero
    return Prediction(attainment, p_ttft, p_tpot, rate * attainment, utilisation, tpot, batch)


def backlog(obs: Observation, costs: StageCosts) -> dict[Role, float]:
    """Requests at E and P beyond what the measured load keeps there (λ·s in service plus one queued
    per worker holding the role): the queue a burst left behind."""
    img = obs.load(Kind.IMAGE)
    kept = {
        Role.ENCODE: img.rate * costs.encode(img.image_tokens),
        Role.PREFILL: obs.rate * costs.prefill(_mean_prompt(obs.loads)),
    }
    out = {}
    for role, steady in kept.items():
        holders = sum(1 for w in obs.workers if role in w.routing)
        out[role] = max(obs.stage(role).in_flight - steady - holders, 0.0)
    return out
