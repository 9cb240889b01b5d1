"""Lossy serving knobs side by side: what each costs in answers on the trained model and what it buys
in bytes and time on the `small` preset. Printed, not asserted (`make bench-fidelity`).

python -m benchmarks.fidelity [--n 30] [--seed 4242] [--settings off,int8,image0.5,...] [--no-speed]

Fidelity: for each setting, `epd serve --topology e+p+d` of the shipped `epd-shapes` (with the
setting's server flags; pruning rates per request), `epd eval` over every task (`--n` items each,
seeds never used in training), per task: accuracy with its 95 % interval, retention (accuracy over
the all-off accuracy) and agreement (the share of items whose answer equals the all-off answer,
with its interval: paired, so a knob that changes answers shows even where accuracy does not move).
Each pruning rate is also run with the random-selection baseline at the same budget.

Speed: the `small` preset (random weights, the shapes of a small VLM) as `e+p+d`, 16 concurrent
image-heavy requests (`epd bench`) per setting: visual tokens per request, P→D bytes per request
(from the server's `epd:transfer_bytes_total`), TTFT and TPOT medians.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx

from loadgen.cli import bench
from loadgen.server import start_server, stop_server
from serving.config import default_model, default_model_dir
from serving.evals.report import Report
from serving.evals.score import wilson
from serving.evals.served import evaluate_served
from serving.evals.tasks import TASKS, items


@dataclass(frozen=True)
class Setting:
    name: str
    flags: tuple[str, ...] = ()  # the server's (settings with the same flags share one server)
    image: float = 0.0  # per request, mm_processor_kwargs
    video: float = 0.0
    kv: float = 1.0  # per request, visual_kv_budget

    @property
    def extra(self) -> dict:
        rates = {"image_pruning_rate": self.image, "video_pruning_rate": self.video}
        out: dict = {"mm_processor_kwargs": rates} if self.image or self.video else {}
        return out | ({"visual_kv_budget": self.kv} if self.kv < 1 else {})


RANDOM = (
    "--image-pruning-method",
    "random",
    "--video-pruning-method",
    "random",
    "--visual-kv-method",
    "random",
)
INT8 = ("--kv-transfer-dtype", "int8")
SETTINGS = {
    "off": Setting("off"),
    "int8": Setting("int8 P→D transfer", INT8),
    **{f"image{q}": Setting(f"image pruning {q}", image=q) for q in (0.25, 0.5, 0.75)},
    **{f"image{q}-random": Setting(f"image random {q}", RANDOM, image=q) for q in (0.25, 0.5, 0.75)},
    **{f"video{q}": Setting(f"video pruning {q}", video=q) for q in (0.5, 0.75)},
    **{f"video{q}-random": Setting(f"video random {q}", RANDOM, video=q) for q in (0.5, 0.75)},
    **{f"kv{f}": Setting(f"KV budget {f}", kv=f) for f in (0.5, 0.25, 0.1)},
    **{f"kv{f}-random": Setting(f"KV random {f}", RANDOM, kv=f) for f in (0.5, 0.25, 0.1)},
}
# Speed: the small preset under image-heavy load, the rate as the server's default.
SPEED = {
    "off": Setting("off"),
    "int8": Setting("int8 P→D transfer", INT8),
    "image0.5": Setting("image pruning 0.5", ("--image-pruning-rate", "0.5")),
    "image0.75": Setting("image pruning 0.75", ("--image-pruning-rate", "0.75")),
    "kv0.25": Setting("KV budget 0.25", ("--visual-kv-budget", "0.25")),
}


def transfer_bytes(url: str, edge: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("epd:transfer_bytes_total{") and f'edge="{edge}"' in line
    )


def fidelity(settings: list[Setting], n: int, seed: int, out: Path) -> dict[str, Report]:
    """Every setting's eval, one server per distinct set of server flags."""
    model = str(default_model())
    reports: dict[str, Report] = {}
    for flags in dict.fromkeys(s.flags for s in settings):
        log = out / f"fidelity-{len(reports)}.log"
        proc, url = start_server(["--model", model, "--topology", "e+p+d", *flags], log, timeout_s=300)
        try:
            for setting in (s for s in settings if s.flags == flags):
                asked = items(seed, TASKS, n)
                run = evaluate_served(f"{url}/v1", Path(model).name, asked, seed, setting.extra)
                reports[setting.name] = asyncio.run(run)
        finally:
            stop_server(proc)
    return {s.name: reports[s.name] for s in settings}


def speed(setting: Setting, out: Path) -> dict:
    from serving.engine.models.builder import ensure_model

    model = str(ensure_model(default_model_dir("small"), "small"))
    flags = ["--model", model, "--topology", "e+p+d", "--no-prefix-caching", *setting.flags]
    proc, url = start_server(flags, out / "speed.log", timeout_s=300)
    try:
        before = {edge: transfer_bytes(url, edge) for edge in ("e2p", "p2d")}
        ns = SimpleNamespace(
            base_url=f"{url}/v1", model=Path(model).name, api_key=None, workload="image-heavy",
            image_repeat_ratio=None, mm_bucket=None, rate=None, rates=None, concurrency=16,
            arrival="poisson", burstiness=1.0, num_requests=48, duration=None, warmup=4, seed=3,
            slo="ttft=3,tpot=0.2", out=str(out / "speed.json"), no_progress=True,
        )  # fmt: skip
        summary = bench(ns)[0]["summary"]
        for edge in ("e2p", "p2d"):
            summary[f"{edge}_bytes"] = (transfer_bytes(url, edge) - before[edge]) / 52
    finally:
        stop_server(proc)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=30, help="items per task")
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"of: {', '.join(SETTINGS)}")
    p.add_argument("--no-speed", action="store_true")
    args = p.parse_args()
    chosen = [SETTINGS[s] for s in args.settings.split(",")]
    if chosen[0].name != "off":
        chosen.insert(0, SETTINGS["off"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        reports = fidelity(chosen, args.n, args.seed, out)
        speeds = {} if args.no_speed else {s.name: speed(s, out) for s in SPEED.values()}
    base = reports["off"]
    print(f"\nfidelity: epd-shapes, e+p+d, {args.n} items per task, seed {args.seed}")
    print(f"{'setting':<22}{'task':<14}{'accuracy':>18}{'retention':>11}{'agreement':>20}{'prompt tok':>12}")
    for name, report in reports.items():
        base_scores = {s.task: s for s in base.scores()}
        for score in [*report.scores(), report.overall()]:
            rows = [o for o in report.outcomes if score.task in ("all", o.task)]
            ref = {(o.task, o.index): o.answer for o in base.outcomes}
            agree = sum(o.answer == ref[(o.task, o.index)] for o in rows)
            lo, hi = wilson(agree, len(rows))
            b = base_scores.get(score.task, base.overall()).accuracy
            retention = f"{score.accuracy / b:.2f}" if b else "n/a"
            acc = f"{score.accuracy:.2f} [{score.interval[0]:.2f}, {score.interval[1]:.2f}]"
            agreement = f"{agree / len(rows):.2f} [{lo:.2f}, {hi:.2f}]"
            tokens = f"{score.mean_prompt_tokens:.0f}"
            print(f"{name:<22}{score.task:<14}{acc:>18}{retention:>11}{agreement:>20}{tokens:>12}")
    if speeds:
        print("\nspeed: small preset, e+p+d, 16 concurrent image-heavy requests")
        print(
            f"{'setting':<22}{'visual tok/req':>15}{'E→P bytes/req':>15}{'P→D bytes/req':>15}"
            f"{'TTFT p50':>10}{'TTFT mean':>10}{'TPOT p50':>10}{'out tok/s':>11}"
        )
        off = speeds["off"]
        for name, s in speeds.items():
            visual = s["visual_tokens"] / max(1, s["completed"])
            print(
                f"{name:<22}{visual:>15.0f}{s['e2p_bytes']:>15,.0f}{s['p2d_bytes']:>15,.0f}"
                f"{s['ttft_s']['p50']:>9.2f}s{s['ttft_s']['mean']:>9.2f}s"
                f"{1000 * s['tpot_s']['p50']:>8.1f}ms{s['output_token_throughput']:>11.1f}"
            )
        print("over off:")
        for name, s in speeds.items():
            ratios = [
                f"{label} {s[key] / off[key]:.2f}×"
                for label, key in (("E→P bytes", "e2p_bytes"), ("P→D bytes", "p2d_bytes"))
                if off[key]
            ]
            ratios.append(f"TTFT mean {s['ttft_s']['mean'] / off['ttft_s']['mean']:.2f}×")
            ratios.append(f"TPOT p50 {s['tpot_s']['p50'] / off['tpot_s']['p50']:.2f}×")
            ratios.append(f"out tok/s {s['output_token_throughput'] / off['output_token_throughput']:.2f}×")
            print(f"  {name:<20}" + ", ".join(ratios))


if __name__ == "__main__":
    main()
