"""Summary of a run, with the design doc's definitions:
TTFT = first token − arrival; TPOT = (end − first token) / (output tokens − 1); ITL = gaps between
consecutive tokens; SLO attainment = share of requests with TTFT ≤ T_ttft and TPOT ≤ T_tpot;
goodput = requests meeting the SLO per second of the serving window."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from loadgen.client import Record
from serving.evals.score import wilson


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    @classmethod
    def parse(cls, text: str) -> SLO:
        """'ttft=2,tpot=0.2'"""
        fields = dict(part.split("=", 1) for part in text.split(","))
        return cls(float(fields["ttft"]), float(fields["tpot"]))


def ttft(r: Record) -> float:
    return r.first_token - r.arrival


def tpot(r: Record) -> float:
    return (r.end - r.first_token) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def itls(r: Record) -> list[float]:
    return [b - a for a, b in zip(r.token_times, r.token_times[1:], strict=False)]


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


def summarize(records: list[Record], slo: SLO) -> dict:
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.error is None]
    window = (max(r.end for r in ok) - min(r.arrival for r in measured)) if ok else float("nan")
    met = [r for r in ok if ttft(r) <= slo.ttft_s and tpot(r) <= slo.tpot_s]
    output = sum(r.output_tokens for r in ok)
    return {
        "requests": len(measured),
        "completed": len(ok),
        "failures": dict(Counter(r.error for r in measured if r.error)),
        "duration_s": window,
        "request_throughput": len(ok) / window if ok else 0.0,
        "output_token_throughput": output / window if ok else 0.0,
        "ttft_s": stats([ttft(r) for r in ok]),
        "tpot_s": stats([tpot(r) for r in ok if r.output_tokens > 1]),
        "itl_s": stats([g for r in ok for g in itls(r)]),
        "e2e_s": stats([r.end - r.arrival for r in ok]),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        # Failed requests count against attainment: they did not meet the SLO.
        "slo_attainment": len(met) / len(measured) if measured else 0.0,
        "goodput": len(met) / window if ok else 0.0,
        # Visual tokens as the server counted them: images' and videos' together, and videos' alone.
        "visual_tokens": sum(r.image_tokens for r in ok),
        "video_tokens": sum(r.video_tokens for r in ok),
        **_answers(measured),
    }


def _answers(measured: list[Record]) -> dict:
    """Requests with known answers: the share answered right, failures counted wrong (a benchmark must
    not look fast by answering wrong or not at all)."""
    scored = [r for r in measured if r.expected is not None]
    if not scored:
        return {}
    right = sum(r.correct for r in scored)
    lo, hi = wilson(right, len(scored))
    return {
        "answers": {
            "scored": len(scored),
            "right": right,
            "accuracy": right / len(scored),
            "interval": [lo, hi],
        }
    }
