"""`make bench-epd`: the same model served twice on the same two cores — colocated (`epd`, two
workers, one core each) and disaggregated (`e+p+d`, E and P sharing core 0, D alone on core 1) — each
swept with the image-heavy workload, printed side by side."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

from loadgen import report
from loadgen.cli import bench
from loadgen.server import start_server, stop_server

SETUPS = (
    ("epd", ["--topology", "epd", "--prefill", "2", "--pin-cpus", "epd=0,1"]),
    ("e+p+d", ["--topology", "e+p+d", "--pin-cpus", "e=0;p=0;d=1"]),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="small")
    p.add_argument("--rates", default="0.5,1,2,3")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--slo", default="ttft=3,tpot=0.04")
    p.add_argument("--out", default="bench-epd")
    args = p.parse_args()
    from serving.config import default_model_dir
    from serving.engine.models.builder import ensure_model

    model = str(ensure_model(default_model_dir(args.preset), args.preset))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, extra in SETUPS:
        log = Path(tempfile.gettempdir()) / f"epd-bench-{name}.log"
        proc, url = start_server(["--model", model, *extra], log)
        try:
            ns = SimpleNamespace(
                base_url=f"{url}/v1",
                model=Path(model).name,
                api_key=None,
                workload="image-heavy",
                image_repeat_ratio=None,
                mm_bucket=None,
                rate=None,
                rates=args.rates,
                concurrency=None,
                arrival="poisson",
                burstiness=1.0,
                num_requests=args.num_requests,
                duration=None,
                warmup=2,
                seed=0,
                slo=args.slo,
                out=str(out / f"{name.replace('+', '_')}.json"),
                no_progress=True,
            )
            print(f"\n######## {name} ########")
            results[name] = bench(ns)
        finally:
            stop_server(proc)
    print_comparison(results, args.slo)


def print_comparison(results: dict[str, list[dict]], slo: str) -> None:
    a, b = "epd", "e+p+d"
    print(f"\n==== colocated (epd) vs disaggregated (e+p+d), same 2 CPU cores, image-heavy, SLO {slo} ====")
    head = [
        "rate",
        "P99 TTFT s",
        "",
        "ratio",
        "P99 TPOT s",
        "",
        "ratio",
        "attain %",
        "",
        "goodput",
        "",
        "ratio",
    ]
    print(" | ".join(f"{h:>9}" for h in head))
    print(" | ".join(f"{h:>9}" for h in ["", a, b, "b/a", a, b, "b/a", a, b, a, b, "b/a"]))
    for ra, rb in zip(results[a], results[b], strict=True):
        sa, sb = ra["summary"], rb["summary"]
        row = [
            ra["rate"],
            sa["ttft_s"]["p99"],
            sb["ttft_s"]["p99"],
            sb["ttft_s"]["p99"] / sa["ttft_s"]["p99"],
            sa["tpot_s"]["p99"],
            sb["tpot_s"]["p99"],
            sb["tpot_s"]["p99"] / sa["tpot_s"]["p99"],
            sa["slo_attainment"] * 100,
            sb["slo_attainment"] * 100,
            sa["goodput"],
            sb["goodput"],
            sb["goodput"] / sa["goodput"] if sa["goodput"] else float("inf"),
        ]
        print(" | ".join(f"{v:>9.3g}" for v in row))
    best = {k: report.best_rate(v) for k, v in results.items()}
    print(f"highest rate with >= 90 % attainment: epd {best[a]}, e+p+d {best[b]}")


if __name__ == "__main__":
    main()
