"""The simulator against queueing theory and against itself, and the policy running inside it."""

from __future__ import annotations

import numpy as np
import pytest

from serving.controller.model import StageCosts
from serving.controller.observation import Slo
from serving.controller.policy import Policy, PolicyConfig
from serving.sim.report import recovery_s, windows
from serving.sim.simulator import SimConfig, Simulator
from serving.sim.workload import Phase, SimRequest, Tokens, from_workload, shifting
from serving.types import Role, parse_roles

SLO = Slo(ttft_s=1.0, tpot_s=0.05)
COSTS = StageCosts(
    encode_base_s=0.02,
    encode_per_token_s=2e-3,
    prefill_base_s=0.01,
    prefill_per_token_s=2e-5,
    decode_base_s=0.01,
    decode_per_seq_s=5e-4,
    switch_s=0.5,
)


def pool(spec: str) -> list:
    return [parse_roles(x) for x in spec.split(",")]


def poisson(n: int, rate: float, seed: int, **tokens: int) -> list[SimRequest]:
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n))
    shape = {"prompt_tokens": 100, "image_tokens": 0, "output_tokens": 1, **tokens}
    return [SimRequest(i, float(t), **shape) for i, t in enumerate(arrivals)]


def shifting_load(seed: int = 0) -> list[SimRequest]:
    phases = [Phase("text", 3.0, 60.0), Phase("image-heavy", 4.5, 90.0)]
    reqs = shifting(phases, seed)
    return from_workload(reqs, [r.arrival or 0.0 for r in reqs], Tokens())


def test_md1_waiting_time_matches_the_closed_form() -> None:
    """One prefill worker, constant service s, Poisson arrivals: mean wait = ρ·s / (2(1 − ρ))."""
    s, rate = 0.1, 6.0
    costs = StageCosts(prefill_base_s=s, prefill_per_token_s=0.0, e2p_s=0.0, p2d_s=0.0)
    result = Simulator(SimConfig(costs, SLO), pool("p,d")).run(poisson(30_000, rate, seed=1))
    waits = [r.prefill_queue_s for r in result.records]
    rho = rate * s
    expected = rho * s / (2 * (1 - rho))
    assert len(waits) == 30_000
    assert np.mean(waits) == pytest.approx(expected, rel=0.08)
    assert all(r.prefill_s == pytest.approx(s) for r in result.records)


def test_littles_law_holds_on_its_own_output() -> None:
    """For the whole system and for each queue: time-average number = arrival rate × mean time, over a
    run that drains. The areas are integrated from queue lengths, the times from each request's own
    timings: two independent sets of bookkeeping that must agree."""
    reqs = shifting_load()
    result = Simulator(SimConfig(COSTS, SLO), pool("e,p,d,d")).run(reqs)
    assert len(result.records) == len(reqs) and all(r.ok for r in result.records)
    sojourn = sum(r.end - r.arrival for r in result.records)
    assert result.in_system_area == pytest.approx(sojourn, rel=1e-9)
    encode_waits = sum(r.encode_queue_s or 0.0 for r in result.records)
    prefill_waits = sum(r.prefill_queue_s or 0.0 for r in result.records)
    assert encode_waits > 1.0 and prefill_waits > 0.0  # the check is not vacuous
    assert result.queue_area[Role.ENCODE] == pytest.approx(encode_waits, rel=1e-9)
    assert result.queue_area[Role.PREFILL] == pytest.approx(prefill_waits, rel=1e-9)


def test_the_same_seed_gives_the_same_run() -> None:
    def run(seed: int) -> list[tuple[float, float]]:
        policy = Policy(PolicyConfig(), COSTS)
        sim = Simulator(SimConfig(COSTS, SLO, seed=seed), pool("e,p,d,d"), policy)
        result = sim.run(shifting_load(seed))
        return [(r.arrival, r.end) for r in result.records] + [(d.at, 0.0) for d in result.decisions]

    assert run(3) == run(3)


def test_a_request_waiting_for_a_decode_slot_takes_its_own_steps_only() -> None:
    """Batch of one: the second request joins when the first leaves and needs its two steps."""
    costs = StageCosts(prefill_base_s=0.0, prefill_per_token_s=0.0, decode_base_s=0.01, decode_per_seq_s=0.0,
                       e2p_s=0.0, p2d_s=0.0, max_decode_batch=1)  # fmt: skip
    reqs = [SimRequest(i, 0.0, 10, 0, 3) for i in range(2)]
    ends = sorted(r.end for r in Simulator(SimConfig(costs, SLO), pool("p,d")).run(reqs).records)
    assert ends == pytest.approx([0.02, 0.04])


def test_requests_still_running_at_the_end_count_as_failed() -> None:
    slow = StageCosts(prefill_base_s=10.0, prefill_per_token_s=0.0)
    reqs = poisson(50, 5.0, seed=2)
    result = Simulator(SimConfig(slow, SLO), pool("p,d")).run(reqs, until=20.0)
    assert len(result.records) == 50
    assert 0 < sum(r.ok for r in result.records) < 50
    assert all(not r.met(SLO) for r in result.records if not r.ok)


def test_the_controller_restores_the_slo_after_the_mix_shifts() -> None:
    reqs = shifting_load()
    static = Simulator(SimConfig(COSTS, SLO), pool("e,p,d,d")).run(reqs)
    policy = Policy(PolicyConfig(), COSTS)
    live = Simulator(SimConfig(COSTS, SLO), pool("e,p,d,d"), policy).run(reqs)
    met = lambda res: sum(r.met(SLO) for r in res.records) / len(reqs)  # noqa: E731
    assert met(static) < SLO.attainment  # the text-tuned split misses once images arrive
    switches = [d for d in live.decisions if d.applied]
    assert switches and all(d.action.roles == parse_roles("e") for d in switches)
    assert met(live) > met(static)
    assert recovery_s(live.records, SLO, shift_at=60.0) < recovery_s(static.records, SLO, shift_at=60.0)


def test_a_stationary_load_does_not_flap() -> None:
    reqs = from_workload(*_stationary(), Tokens())
    policy = Policy(PolicyConfig(), COSTS)
    result = Simulator(SimConfig(COSTS, SLO), pool("e,p,d,d"), policy).run(reqs)
    moves: dict[str, list] = {}
    for d in result.decisions:
        moves.setdefault(d.action.worker or "", []).append(d.action.roles)
    assert all(len(m) == 1 for m in moves.values()), moves  # no worker moved twice
    assert len(result.decisions) <= 1
    assert all(a >= SLO.attainment for _, a, n in windows(result.records, SLO)[3:] if n >= 10)


def _stationary() -> tuple[list, list[float]]:
    reqs = shifting([Phase("mixed", 2.0, 300.0)], seed=5)
    return reqs, [r.arrival or 0.0 for r in reqs]


def test_advisory_mode_actuates_nothing() -> None:
    reqs = shifting_load()
    policy = Policy(PolicyConfig(), COSTS)
    result = Simulator(SimConfig(COSTS, SLO), pool("e,p,d,d"), policy, mode="advisory").run(reqs)
    assert result.decisions and not any(d.applied for d in result.decisions)
    assert all(counts == {"e": 1, "p": 1, "d": 2} for _, counts in result.timeline)
    assert result.worker_seconds[Role.ENCODE] == pytest.approx(result.duration_s)
