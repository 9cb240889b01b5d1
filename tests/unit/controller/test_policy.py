"""Replays of the policy on a fake clock with scripted observations: no Ray, no HTTP, no engine."""

from __future__ import annotations

from serving.controller.actions import ActionKind
from serving.controller.model import StageCosts
from serving.controller.observation import (
    Kind,
    KindLoad,
    Observation,
    Slo,
    StageLoad,
    TtftBreakdown,
    WorkerView,
)
from serving.controller.policy import Policy, PolicyConfig, role_sets
from serving.types import Role, WorkerPhase, parse_roles

# encode 10 ms + 0.3 ms an image token; prefill 10 ms + 0.02 ms a token; decode 10 ms a step + 1 ms
# per extra sequence.
COSTS = StageCosts(encode_per_token_s=3e-4, prefill_per_token_s=2e-5)
SLO = Slo(ttft_s=2.0, tpot_s=0.05)


def workers(spec: str, phases: dict[str, WorkerPhase] | None = None) -> tuple[WorkerView, ...]:
    """'e,p,d,d' → w0..w3 holding those roles."""
    phases = phases or {}
    out = []
    for i, label in enumerate(spec.split(",")):
        roles = parse_roles(label)
        phase = phases.get(f"w{i}", WorkerPhase.ACTIVE)
        routing = roles if phase is WorkerPhase.ACTIVE else frozenset()
        out.append(WorkerView(f"w{i}", roles, phase, routing))
    return tuple(out)


def obs(
    now: float,
    pool: tuple[WorkerView, ...],
    loads: dict[Kind, KindLoad],
    attainment: float = 1.0,
    ttft_att: float | None = None,
    tpot_att: float | None = None,
    ttft: TtftBreakdown | None = None,
    stages: dict[Role, StageLoad] | None = None,
) -> Observation:
    return Observation(
        now=now,
        window_s=20.0,
        slo=SLO,
        requests=200,
        loads=loads,
        stages=stages or {},
        ttft=ttft or TtftBreakdown(),
        attainment_ttft=attainment if ttft_att is None else ttft_att,
        attainment_tpot=attainment if tpot_att is None else tpot_att,
        attainment=attainment,
        workers=pool,
        # Twenty requests that arrived a second ago, as many meeting the SLO as `attainment` says.
        outcomes=tuple((now - 1.0, i < round(attainment * 20)) for i in range(20)),
    )


# One encode worker is offered 1.55 s of work a second: overloaded; two are not.
IMAGE_BURST = {Kind.IMAGE: KindLoad(rate=5.0, prompt_tokens=1100, image_tokens=1000, output_tokens=32)}
LONG_OUTPUTS = {Kind.TEXT: KindLoad(rate=2.0, prompt_tokens=100, output_tokens=500)}
SLO_LONG = Slo(ttft_s=1.0, tpot_s=0.02)
BALANCED = {
    Kind.TEXT: KindLoad(rate=2.0, prompt_tokens=200, output_tokens=64),
    Kind.IMAGE: KindLoad(rate=2.0, prompt_tokens=300, image_tokens=256, output_tokens=32),
}


def test_an_image_burst_moves_a_worker_to_encode() -> None:
    policy = Policy(PolicyConfig(), COSTS)
    missing = obs(
        100.0,
        workers("e,p,d,d"),
        IMAGE_BURST,
        attainment=0.3,
        ttft=TtftBreakdown(encode_wait_s=2, encode_s=0.1),
    )
    actions = policy.decide(missing, 100.0)
    assert [a.kind for a in actions] == [ActionKind.SWITCH]
    assert actions[0].roles == parse_roles("e") and actions[0].worker in ("w2", "w3")
    assert actions[0].predicted_after > actions[0].predicted_before
    assert "encode" in actions[0].reason or "e=" in actions[0].reason


def test_long_outputs_move_a_worker_to_decode() -> None:
    policy = Policy(PolicyConfig(), COSTS)
    o = obs(100.0, workers("e,p,p,d,d"), LONG_OUTPUTS, attainment=0.6, ttft_att=1.0, tpot_att=0.6)
    o = Observation(**{**o.__dict__, "slo": SLO_LONG})
    actions = policy.decide(o, 100.0)
    assert [a.kind for a in actions] == [ActionKind.SWITCH]
    assert actions[0].roles == parse_roles("d")
    assert "decode owns the misses" in actions[0].reason


def test_the_last_worker_of_a_needed_role_is_never_moved_or_removed() -> None:
    cfg = PolicyConfig(min_workers=1)
    policy = Policy(cfg, COSTS)
    # Every worker is the last of its role: the image burst cannot be met by a switch.
    actions = policy.decide(obs(100.0, workers("e,p,d"), IMAGE_BURST, attainment=0.2), 100.0)
    assert actions == []
    # A light load that meets the SLO with room to spare: still no remove.
    light = {Kind.IMAGE: KindLoad(rate=0.1, prompt_tokens=100, image_tokens=64, output_tokens=8)}
    assert policy.decide(obs(200.0, workers("e,p,d"), light), 200.0) == []


def test_an_add_is_chosen_when_no_switch_helps_and_the_budget_allows() -> None:
    policy = Policy(PolicyConfig(max_workers=4), COSTS)
    actions = policy.decide(obs(100.0, workers("e,p,d"), IMAGE_BURST, attainment=0.2), 100.0)
    assert [(a.kind, a.roles) for a in actions] == [(ActionKind.ADD, parse_roles("e"))]


def test_a_remove_leaves_the_slo_met_and_keeps_the_floor() -> None:
    policy = Policy(PolicyConfig(min_workers=3), COSTS)
    light = {Kind.TEXT: KindLoad(rate=0.5, prompt_tokens=100, output_tokens=16)}
    actions = policy.decide(obs(100.0, workers("e,p,p,d,d"), light), 100.0)
    assert [a.kind for a in actions] == [ActionKind.REMOVE]
    assert actions[0].predicted_after >= SLO.attainment


def test_a_stationary_load_causes_no_switches() -> None:
    policy = Policy(PolicyConfig(), COSTS)
    pool = workers("e,p,d,d")
    for tick in range(500):
        now = 2.0 * tick
        assert policy.decide(obs(now, pool, BALANCED, attainment=0.97), now) == []


def test_a_draining_worker_is_not_chosen_and_a_moved_one_waits_for_new_evidence() -> None:
    policy = Policy(PolicyConfig(cooldown_s=0.0, settle_s=30.0, min_gain=0.0), COSTS)
    pool = workers("e,p,d,d,d", phases={"w2": WorkerPhase.DRAINING})
    missing = obs(100.0, pool, IMAGE_BURST, attainment=0.3)
    first = policy.decide(missing, 100.0)
    assert first and all(a.worker != "w2" for a in first)
    moved = first[0].worker
    # The next tick sees the same (old) evidence: the moved worker is not moved again.
    again = policy.decide(obs(102.0, workers("e,p,d,d,d"), IMAGE_BURST, attainment=0.3), 102.0)
    assert all(a.worker != moved for a in again)


def test_cooldown_and_too_little_evidence_hold_back() -> None:
    policy = Policy(PolicyConfig(cooldown_s=10.0), COSTS)
    assert policy.decide(obs(100.0, workers("e,p,d,d"), IMAGE_BURST, attainment=0.3), 100.0)
    assert policy.decide(obs(105.0, workers("e,e,p,d"), IMAGE_BURST, attainment=0.3), 105.0) == []
    # Three finished and five arrived in the window: too little to act on.
    few = {Kind.IMAGE: KindLoad(rate=0.25, prompt_tokens=1100, image_tokens=1000, output_tokens=32)}
    thin = Observation(**{**obs(200.0, workers("e,p,d,d"), few, attainment=0.3).__dict__, "requests": 3})
    assert Policy(PolicyConfig(), COSTS).decide(thin, 200.0) == []


def test_colocated_topologies_switch_between_their_own_role_sets() -> None:
    policy = Policy(PolicyConfig(role_sets=role_sets("e+pd")), COSTS)
    actions = policy.decide(obs(100.0, workers("e,pd,pd,pd"), IMAGE_BURST, attainment=0.3), 100.0)
    assert actions and all(a.roles in role_sets("e+pd") for a in actions)
    assert actions[0].roles == parse_roles("e")


def test_admission_limit_follows_the_decode_pool() -> None:
    policy = Policy(PolicyConfig(manage_admission=True), COSTS)
    actions = policy.decide(obs(100.0, workers("e,p,d,d"), BALANCED, attainment=0.97), 100.0)
    limits = [a for a in actions if a.kind is ActionKind.ADMISSION]
    # 1 + (50 ms - 10 ms) / 1 ms = 41 sequences a decode worker, two of them.
    assert [a.limit for a in limits] == [82]


def test_a_move_is_never_undone_while_its_evidence_is_fresh() -> None:
    policy = Policy(PolicyConfig(cooldown_s=0.0, settle_s=5.0, reverse_hold_s=100.0, hold_s=0.0), COSTS)
    first = policy.decide(obs(100.0, workers("e,p,d,d"), IMAGE_BURST, attainment=0.3), 100.0)
    assert [(a.kind, a.roles) for a in first] == [(ActionKind.SWITCH, parse_roles("e"))]
    # The load flips back to long text outputs at once: moving an encode worker back to decode would
    # undo the move; within the hold it is not a candidate, later it is.
    back = Observation(
        **{
            **obs(110.0, workers("e,e,p,d"), LONG_OUTPUTS, attainment=0.5, tpot_att=0.5).__dict__,
            "slo": SLO_LONG,
        }
    )
    assert all(a.roles != parse_roles("d") for a in policy.decide(back, 110.0))
    later = Observation(**{**back.__dict__, "now": 300.0})
    assert [a.roles for a in policy.decide(later, 300.0)] == [parse_roles("d")]


def test_a_move_that_did_not_deliver_holds_further_moves_while_the_load_is_the_same() -> None:
    policy = Policy(PolicyConfig(cooldown_s=0.0, settle_s=5.0, hold_s=60.0), COSTS)
    assert policy.decide(obs(100.0, workers("e,p,d,d,d"), IMAGE_BURST, attainment=0.3), 100.0)
    # After the move the window shows no gain (the bottleneck lies elsewhere): no further moves ...
    stuck = obs(110.0, workers("e,e,p,d,d"), IMAGE_BURST, attainment=0.3)
    assert policy.decide(stuck, 110.0) == []
    assert policy.hold_until == 170.0
    assert policy.decide(obs(150.0, workers("e,e,p,d,d"), IMAGE_BURST, attainment=0.3), 150.0) == []
    # ... until the load changes.
    heavier = {Kind.IMAGE: KindLoad(rate=9.0, prompt_tokens=1100, image_tokens=1000, output_tokens=32)}
    assert policy.decide(obs(151.0, workers("e,e,p,d,d"), heavier, attainment=0.1), 151.0)


def test_the_encoder_stays_while_no_image_arrives() -> None:
    """Text with long outputs: decode is short, but the topology's only encode worker is not taken —
    images may come back, and with no encoder they would wait or fail."""
    policy = Policy(PolicyConfig(), COSTS)
    o = Observation(
        **{
            **obs(100.0, workers("e,p,d"), LONG_OUTPUTS, attainment=0.3, tpot_att=0.3).__dict__,
            "slo": SLO_LONG,
        }
    )
    assert all(a.worker != "w0" for a in policy.decide(o, 100.0))


def test_the_worker_budget_counts_workers_still_starting() -> None:
    # Even with the starting encoder, two are not enough for this burst: an add would help, but the
    # starting worker already fills the budget of four.
    burst = {Kind.IMAGE: KindLoad(rate=9.0, prompt_tokens=1100, image_tokens=1000, output_tokens=32)}
    pool = workers("e,p,d,e", phases={"w3": WorkerPhase.STARTING})
    assert (
        Policy(PolicyConfig(max_workers=4), COSTS).decide(obs(100.0, pool, burst, attainment=0.2), 100.0)
        == []
    )
    adds = Policy(PolicyConfig(max_workers=5), COSTS).decide(obs(100.0, pool, burst, attainment=0.2), 100.0)
    assert [a.kind for a in adds] == [ActionKind.ADD]


def test_the_model_stays_finite_at_a_thousand_workers() -> None:
    from serving.controller.model import predict

    big = {Kind.TEXT: KindLoad(rate=7000.0, prompt_tokens=1000, output_tokens=2)}
    pool = [parse_roles("p")] * 800 + [parse_roles("d")] * 200
    prediction = predict(pool, big, StageCosts(prefill_base_s=0.1, prefill_per_token_s=0.0), SLO)
    assert 0.0 <= prediction.attainment <= 1.0
    assert 0.0 < prediction.utilisation[Role.PREFILL] < 1.0
