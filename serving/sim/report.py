"""The simulator's results in `epd bench`'s report format (same summary, table and JSON), plus what
only a simulation knows: per-stage utilisation, the pool over time, and the controller's actions."""

from __future__ import annotations

import math
from collections.abc import Sequence

from loadgen import report as bench_report
from loadgen.client import Record
from loadgen.metrics import SLO, summarize
from serving.controller.observation import RequestRecord, Slo
from serving.sim.simulator import SimResult

_TOKEN_TIMES_UP_TO = 20_000  # requests; beyond that ITL is left out to keep big runs lean


def to_records(records: Sequence[RequestRecord]) -> list[Record]:
    """The load generator's records (client clock = simulated clock), tokens spread evenly."""
    out = []
    keep_tokens = len(records) <= _TOKEN_TIMES_UP_TO
    for i, r in enumerate(sorted(records, key=lambda r: r.arrival)):
        first = None if r.ttft_s is None else r.arrival + r.ttft_s
        times: list[float] = []
        if keep_tokens and first is not None:
            n = max(r.output_tokens, 1)
            step = (r.end - first) / (n - 1) if n > 1 else 0.0
            times = [first + k * step for k in range(n)]
        out.append(
            Record(
                index=i,
                arrival=r.arrival,
                first_token=first,
                token_times=times,
                end=r.end,
                output_tokens=r.output_tokens,
                prompt_tokens=r.prompt_tokens,
                images=1 if r.image_tokens else 0,
                error=None if r.ok else "failed",
            )
        )
    return out


def summary(result: SimResult, slo: Slo) -> dict:
    s = summarize(to_records(result.records), SLO(slo.ttft_s, slo.tpot_s))
    s["utilisation"] = {r.name.lower(): round(u, 4) for r, u in result.utilisation().items()}
    return s


def windows(
    records: Sequence[RequestRecord], slo: Slo, width_s: float = 10.0
) -> list[tuple[float, float, int]]:
    """SLO attainment per window of arrival time: (window start, attainment, requests)."""
    if not records:
        return []
    buckets: dict[int, list[bool]] = {}
    for r in records:
        buckets.setdefault(int(r.arrival // width_s), []).append(r.met(slo))
    return [(k * width_s, sum(v) / len(v), len(v)) for k, v in sorted(buckets.items())]


def recovery_s(records: Sequence[RequestRecord], slo: Slo, shift_at: float, width_s: float = 10.0) -> float:
    """Seconds from `shift_at` to the start of the first window after it whose attainment is back at
    the target and stays there; inf if it never is."""
    after = [(t, a) for t, a, _ in windows(records, slo, width_s) if t >= shift_at]
    for i, (t, _) in enumerate(after):
        if all(a >= slo.attainment for _, a in after[i:]):
            return t - shift_at
    return math.inf


def text(result: SimResult, slo: Slo, title: str = "") -> str:
    s = summary(result, slo)
    lines = [bench_report.table(s, title)]
    util = ", ".join(
        f"{r.name.lower()} {u:.0%}" for r, u in result.utilisation().items() if result.worker_seconds[r]
    )
    lines.append(f"utilisation per stage: {util}")
    if result.decisions:
        lines.append(f"controller actions ({len(result.decisions)}):")
        for d in result.decisions[:40]:
            lines.append(f"  t={d.at:7.1f} s {'' if d.applied else '(not applied) '}{d.action.describe()}")
        if len(result.decisions) > 40:
            lines.append(f"  ... {len(result.decisions) - 40} more")
    return "\n".join(lines)
