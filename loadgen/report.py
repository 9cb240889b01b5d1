"""Reports: JSON with every record plus the summary, and the printed table."""

from __future__ import annotations

import json
from pathlib import Path

from loadgen.client import Record


def write(path: str | Path, runs: list[dict]) -> None:
    Path(path).write_text(json.dumps({"runs": runs}, indent=2) + "\n")


def run_entry(label: dict, summary: dict, records: list[Record]) -> dict:
    return {**label, "summary": summary, "records": [r.to_dict() for r in records]}


def table(summary: dict, title: str = "") -> str:
    s = summary
    lines = [f"==== {title} ====" if title else "===="]
    lines.append(f"requests {s['requests']}, completed {s['completed']}, failures {s['failures'] or 'none'}")
    lines.append(
        f"duration {s['duration_s']:.2f} s | {s['request_throughput']:.2f} req/s | "
        f"{s['output_token_throughput']:.1f} output tok/s"
    )
    lines.append(f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        v = s[key]
        lines.append(
            f"{key[:-2].upper():<6}" + "".join(f"{v[p] * 1000:>10.1f}" for p in ("mean", "p50", "p90", "p99"))
        )
    slo = s["slo"]
    lines.append(
        f"SLO (TTFT <= {slo['ttft_s']} s, TPOT <= {slo['tpot_s']} s): attainment "
        f"{s['slo_attainment'] * 100:.1f} %, goodput {s['goodput']:.2f} req/s"
    )
    if s.get("visual_tokens"):
        lines.append(
            f"visual tokens {s['visual_tokens']} (of which video {s.get('video_tokens', 0)}), "
            f"{s['visual_tokens'] / max(1, s['completed']):.0f} a request"
        )
    if answers := s.get("answers"):
        lo, hi = answers["interval"]
        lines.append(
            f"answers right: {answers['right']} of {answers['scored']} ({answers['accuracy'] * 100:.1f} %, "
            f"95 % interval {lo * 100:.1f}-{hi * 100:.1f} %)"
        )
    return "\n".join(lines)


def best_rate(runs: list[dict], target: float = 0.9) -> float | None:
    """The highest swept rate whose attainment reaches the target (DistServe's goodput rate)."""
    good = [r["rate"] for r in runs if r.get("rate") and r["summary"]["slo_attainment"] >= target]
    return max(good) if good else None
