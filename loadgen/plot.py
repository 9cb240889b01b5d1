"""PNG plots of reports: latency CDFs, SLO attainment vs request rate, goodput vs rate."""

from __future__ import annotations

import json
from pathlib import Path


def plot(reports: list[str], out: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    series = []  # (label, run)
    for path in reports:
        for run in json.loads(Path(path).read_text())["runs"]:
            label = f"{Path(path).stem}" + (f" @ {run['rate']}/s" if run.get("rate") else "")
            series.append((Path(path).stem, label, run))
    written = []
    for metric, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E latency")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for _, label, run in series:
            values = []
            for r in run["records"]:
                if r["warmup"] or r["error"] or r["first_token"] is None:
                    continue
                if metric == "ttft":
                    values.append(r["first_token"] - r["arrival"])
                elif metric == "tpot" and r["output_tokens"] > 1:
                    values.append((r["end"] - r["first_token"]) / (r["output_tokens"] - 1))
                elif metric == "e2e":
                    values.append(r["end"] - r["arrival"])
            if values:
                xs = np.sort(values)
                ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=label)
        ax.set(xlabel=f"{title} (s)", ylabel="share of requests", title=f"{title} CDF")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / f"{metric}_cdf.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    for key, ylabel in (("slo_attainment", "SLO attainment"), ("goodput", "goodput (req/s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(s[0] for s in series):
            runs = sorted(
                (run for n, _, run in series if n == name and run.get("rate")), key=lambda r: r["rate"]
            )
            if runs:
                ax.plot([r["rate"] for r in runs], [r["summary"][key] for r in runs], marker="o", label=name)
        ax.set(xlabel="request rate (req/s)", ylabel=ylabel, title=f"{ylabel} vs rate")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / f"{key}_vs_rate.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
