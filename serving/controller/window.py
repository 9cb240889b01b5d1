"""The sliding window of finished requests, and the pure function that turns it and the workers'
state into an `Observation`. The gateway feeds the window; the simulator feeds its own."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np

from serving.controller.observation import (
    Kind,
    KindLoad,
    Observation,
    RequestRecord,
    Slo,
    StageLoad,
    TtftBreakdown,
    WorkerView,
)
from serving.types import Role


class WindowSink(Protocol):
    """Where a gateway's metrics send arrivals and finished requests: the controller's window, or
    what forwards them to it (`serving/control/client.py`)."""

    def arrive(self, at: float, kind: Kind) -> None: ...

    def add(self, record: RequestRecord) -> None: ...


class RequestWindow:
    """Arrivals and finished requests of the last `horizon_s` seconds. Thread-safe: the gateway adds
    from its event loop, the controller reads from the control loop.

    Rates come from arrivals, not completions: in overload fewer requests finish than arrive, and a
    rate read from completions would hide exactly the load the controller must see."""

    def __init__(self, horizon_s: float = 300.0, max_records: int = 100_000) -> None:
        self.horizon_s = horizon_s
        self._records: deque[RequestRecord] = deque(maxlen=max_records)
        self._arrivals: deque[tuple[float, Kind]] = deque(maxlen=max_records)
        self._lock = threading.Lock()

    def arrive(self, at: float, kind: Kind) -> None:
        with self._lock:
            self._arrivals.append((at, kind))

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def arrivals(self, start: float, now: float) -> dict[Kind, int]:
        with self._lock:
            self._trim(now)
            counts = dict.fromkeys(Kind, 0)
            for at, kind in self._arrivals:
                if start <= at <= now:
                    counts[kind] += 1
            return counts

    def observe(self, workers: Sequence[WorkerView], now: float, window_s: float, slo: Slo) -> Observation:
        """The observation of the last `window_s` seconds; request shapes of a kind that finished
        nothing in the window come from the whole horizon."""
        with self._lock:
            self._trim(now)
            history = list(self._records)
            counted = bool(self._arrivals)  # a window fed only finished requests reads rates from them
        recent = [r for r in history if now - window_s <= r.end <= now]
        arrivals = self.arrivals(now - window_s, now) if counted else None
        return observe(recent, workers, now, window_s, slo, arrivals, history)

    def _trim(self, now: float) -> None:
        while self._records and self._records[0].end < now - self.horizon_s:
            self._records.popleft()
        while self._arrivals and self._arrivals[0][0] < now - self.horizon_s:
            self._arrivals.popleft()


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else 0.0


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def _stage(waits: list[float], services: list[float], in_flight: int) -> StageLoad:
    return StageLoad(
        in_flight=in_flight,
        wait_p50_s=_pct(waits, 50),
        wait_p90_s=_pct(waits, 90),
        service_mean_s=_mean(services) if services else None,
        service_p50_s=_pct(services, 50) if services else None,
        service_p90_s=_pct(services, 90) if services else None,
        samples=len(services),
    )


def _accounted(r: RequestRecord) -> float:
    """The part of a request's TTFT its stage timings explain."""
    parts = (r.queue_s, r.encode_queue_s, r.encode_s, r.e2p_s, r.prefill_queue_s, r.prefill_s)
    return sum(p or 0.0 for p in parts)


def observe(
    records: Iterable[RequestRecord],
    workers: Sequence[WorkerView],
    now: float,
    window_s: float,
    slo: Slo,
    arrivals: dict[Kind, int] | None = None,
    history: Sequence[RequestRecord] = (),
) -> Observation:
    """The observation of [now - window_s, now]. Rates count `arrivals` in the window (or, without
    them, the arrivals of requests that finished in it); request shapes and service times come from
    the requests that finished (`history` stands in for a kind none of which finished yet)."""
    recs = list(records)
    loads = {}
    for kind in Kind:
        mine = [r for r in recs if r.kind is kind] or [r for r in history if r.kind is kind]
        count = arrivals.get(kind, 0) if arrivals is not None else sum(1 for r in recs if r.kind is kind)
        if count:
            loads[kind] = KindLoad(
                rate=count / window_s,
                prompt_tokens=_mean([r.prompt_tokens for r in mine]),
                image_tokens=_mean([r.image_tokens for r in mine]),
                output_tokens=_mean([r.output_tokens for r in mine]),
            )

    def in_flight(role: Role) -> int:
        return round(sum(w.in_flight / max(len(w.roles), 1) for w in workers if role in w.roles))

    def vals(attr: str) -> list[float]:
        return [v for r in recs if (v := getattr(r, attr)) is not None]

    stages = {
        Role.ENCODE: _stage(vals("encode_queue_s"), vals("encode_s"), in_flight(Role.ENCODE)),
        Role.PREFILL: _stage(vals("prefill_queue_s"), vals("prefill_s"), in_flight(Role.PREFILL)),
        Role.DECODE: _stage([], vals("tpot_s"), sum(w.decoding for w in workers)),
    }
    served = [r for r in recs if r.ok and r.ttft_s is not None]
    judged = len(recs)
    ttft_met = sum(1 for r in served if r.ttft_s is not None and r.ttft_s <= slo.ttft_s)
    tpot_met = sum(1 for r in served if r.tpot_s is None or r.tpot_s <= slo.tpot_s)
    met = sum(1 for r in recs if r.met(slo))
    breakdown = TtftBreakdown(
        queue_s=_mean([r.queue_s for r in served]),
        encode_wait_s=_mean([r.encode_queue_s or 0.0 for r in served]),
        encode_s=_mean([r.encode_s or 0.0 for r in served]),
        e2p_s=_mean([r.e2p_s or 0.0 for r in served]),
        prefill_wait_s=_mean([r.prefill_queue_s or 0.0 for r in served]),
        prefill_s=_mean([r.prefill_s or 0.0 for r in served]),
        other_s=_mean([max((r.ttft_s or 0.0) - _accounted(r), 0.0) for r in served]),
        p2d_s=_mean([r.p2d_s or 0.0 for r in served]),
    )
    return Observation(
        now=now,
        window_s=window_s,
        slo=slo,
        requests=judged,
        loads=loads,
        stages=stages,
        ttft=breakdown,
        attainment_ttft=ttft_met / judged if judged else 1.0,
        attainment_tpot=tpot_met / judged if judged else 1.0,
        attainment=met / judged if judged else 1.0,
        goodput=met / window_s,
        workers=tuple(workers),
        outcomes=tuple((r.arrival, r.met(slo)) for r in recs),
    )
