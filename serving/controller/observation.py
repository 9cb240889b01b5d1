"""What the controller sees: typed, built over a sliding window from finished requests and worker
stats. The simulator builds the same types from its own events."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from serving.types import Role, Roles, WorkerPhase


class Kind(enum.StrEnum):
    """Request kinds whose arrival rates the controller tracks apart: only image requests use E."""

    TEXT = "text"
    IMAGE = "image"


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, as the gateway (or the simulator) accounted it. Times in seconds on
    the clock of whoever records them (the gateway's `time.perf_counter`, or the simulated clock)."""

    arrival: float
    end: float
    kind: Kind
    prompt_tokens: int
    image_tokens: int
    output_tokens: int
    ttft_s: float | None  # None: no token came (failed, aborted)
    tpot_s: float | None  # None: fewer than two tokens
    ok: bool  # finished normally (stop or length)
    queue_s: float = 0.0  # gateway admission wait
    encode_queue_s: float | None = None
    encode_s: float | None = None
    e2p_s: float | None = None
    prefill_queue_s: float | None = None
    prefill_s: float | None = None
    p2d_s: float | None = None

    @classmethod
    def finished(
        cls,
        arrival: float,
        first_token: float | None,
        end: float,
        kind: Kind,
        tokens: tuple[int, int, int],
        ok: bool,
        **stages: float | None,
    ) -> RequestRecord:
        """From raw times: TTFT = first token − arrival, TPOT = (end − first token) / (tokens − 1).
        `tokens` = (prompt, image, output); `stages` the stage timing fields."""
        prompt, image, output = tokens
        ttft = None if first_token is None else first_token - arrival
        tpot = (end - first_token) / (output - 1) if first_token is not None and output > 1 else None
        return cls(arrival, end, kind, prompt, image, output, ttft, tpot, ok, **stages)  # type: ignore[arg-type]

    def met(self, slo: Slo) -> bool:
        return (
            self.ok
            and self.ttft_s is not None
            and self.ttft_s <= slo.ttft_s
            and (self.tpot_s is None or self.tpot_s <= slo.tpot_s)
        )


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9  # the share of requests that must meet both


@dataclass(frozen=True)
class KindLoad:
    """Arrivals of one kind over the window and what each such request asks for, on average."""

    rate: float = 0.0  # requests per second
    prompt_tokens: float = 0.0  # image tokens included
    image_tokens: float = 0.0
    output_tokens: float = 0.0


@dataclass(frozen=True)
class StageLoad:
    """One stage over the window: work in it now, its queue wait and its service time.

    For E and P the service time is per request; for D it is per output token (TPOT)."""

    in_flight: int = 0
    wait_p50_s: float = 0.0
    wait_p90_s: float = 0.0
    service_mean_s: float | None = None  # None: no sample in the window
    service_p50_s: float | None = None
    service_p90_s: float | None = None
    samples: int = 0


@dataclass(frozen=True)
class TtftBreakdown:
    """Mean seconds of TTFT spent in each stage (the design doc's decomposition)."""

    queue_s: float = 0.0  # gateway admission
    encode_wait_s: float = 0.0
    encode_s: float = 0.0
    e2p_s: float = 0.0
    prefill_wait_s: float = 0.0
    prefill_s: float = 0.0
    other_s: float = 0.0  # the rest of TTFT: gateway work, RPC hops, streaming the first token
    p2d_s: float = 0.0  # not part of TTFT (the first token leaves P before the KV moves): for reference

    def owner(self) -> Role:
        """The stage holding the largest share of TTFT, its queue wait included."""
        shares = {
            Role.ENCODE: self.encode_wait_s + self.encode_s,
            Role.PREFILL: self.prefill_wait_s + self.prefill_s + self.e2p_s,
        }
        return max(shares, key=lambda r: shares[r])


@dataclass(frozen=True)
class WorkerView:
    name: str
    roles: Roles
    phase: WorkerPhase
    routing: Roles  # roles new work may go to (narrower than `roles` while draining)
    in_flight: int = 0  # requests the worker holds anything for
    decoding: int = 0  # requests in its decode batch
    kv_usage: float = 0.0  # 0..1
    since: float = 0.0  # when its phase last changed
    target: Roles | None = None  # the roles a move under way gives it (known for the controller's own)

    @property
    def planned(self) -> Roles:
        """The roles to plan with: what it serves once the move under way (if any) is done."""
        if self.phase is WorkerPhase.STARTING:
            return self.roles
        return self.target if self.target is not None else self.routing


@dataclass(frozen=True)
class Observation:
    now: float
    window_s: float
    slo: Slo
    requests: int = 0  # finished in the window
    loads: dict[Kind, KindLoad] = field(default_factory=dict)
    stages: dict[Role, StageLoad] = field(default_factory=dict)
    ttft: TtftBreakdown = TtftBreakdown()
    attainment_ttft: float = 1.0
    attainment_tpot: float = 1.0
    attainment: float = 1.0
    goodput: float = 0.0  # requests per second meeting the SLO
    workers: tuple[WorkerView, ...] = ()
    outcomes: tuple[tuple[float, bool], ...] = ()  # (arrival, met the SLO) of each finished request

    @property
    def rate(self) -> float:
        return sum(k.rate for k in self.loads.values())

    def load(self, kind: Kind) -> KindLoad:
        return self.loads.get(kind, KindLoad())

    def stage(self, role: Role) -> StageLoad:
        return self.stages.get(role, StageLoad())
