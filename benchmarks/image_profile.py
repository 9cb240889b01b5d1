"""Where an image request's time to first token goes under load (`python -m benchmarks.image_profile`).

Starts `epd serve` (colocated by default, pinned like `make bench-peer`'s colocated arm), runs the
image-heavy workload closed-loop at each concurrency (unique images per level), and reads the
server's own stage histograms (`/metrics`) before and after each level. Prints, per level, the mean
per request of each stage that makes up TTFT:

- media: decoding and preprocessing the images on the encode worker (its runtime threads, not the
  engine thread);
- encode queue: from the hand-over to the engine thread to the start of the request's vision batch
  (the engine step in progress, vision batches of earlier requests);
- encode: the vision batch itself (shared with the requests batched with it);
- e2p transfer (disaggregated topologies): pulling the embeddings into the prefill worker;
- prefill queue: from joining the engine's queue to the step that takes its first prompt chunk;
- prefill: from that step's start to the end of the step that computes its first token;
- p2d transfer (disaggregated topologies): pulling the KV into the decode worker;
- other: the server's TTFT less all of the above (gateway, tokenization, Ray hops, delivery).

`--serve-args` compares settings, e.g. `--serve-args "... --max-encode-patches 1024"`; `--before REV`
first profiles that git revision (checked out into a temporary worktree, served with this
environment's packages), then the current tree, one after the other on the same cores.
"""

from __future__ import annotations

import argparse
import tempfile
import urllib.request
from pathlib import Path
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from loadgen.cli import bench
from loadgen.server import checkout, start_server, stop_server

PARTS = (
    ("media", "epd:stage_duration_seconds", "media"),
    ("encode queue", "epd:stage_queue_time_seconds", "encode"),
    ("encode", "epd:stage_duration_seconds", "encode"),
    ("e2p transfer", "epd:stage_duration_seconds", "e2p_transfer"),
    ("prefill queue", "epd:stage_queue_time_seconds", "prefill"),
    ("prefill", "epd:stage_duration_seconds", "prefill"),
    ("p2d transfer", "epd:stage_duration_seconds", "p2d_transfer"),
)
TTFT = "epd:time_to_first_token_seconds"


def scrape(url: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(metric, stage) → (sum, count) of every stage histogram and of TTFT (stage "")."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for suffix, i in (("_sum", 0), ("_count", 1)):
                if sample.name.endswith(suffix):
                    key = (sample.name.removesuffix(suffix), sample.labels.get("stage", ""))
                    out.setdefault(key, [0.0, 0.0])[i] += sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def means(before: dict, after: dict, requests: int) -> dict[str, float]:
    """Each part's time per request over the level (a part a request skipped counts as 0)."""
    out = {}
    for name, metric, stage in PARTS:
        total = after.get((metric, stage), (0.0, 0.0))[0] - before.get((metric, stage), (0.0, 0.0))[0]
        out[name] = total / requests
    ttft = after.get((TTFT, ""), (0.0, 0.0))
    first = before.get((TTFT, ""), (0.0, 0.0))
    out["ttft"] = (ttft[0] - first[0]) / max(1.0, ttft[1] - first[1])
    out["other"] = out["ttft"] - sum(out[name] for name, _, _ in PARTS)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,12")
    p.add_argument("--requests", type=int, default=24, help="measured requests per level (at least 2x c)")
    p.add_argument("--workload", default="image-heavy")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--serve-args", default="--topology epd --prefill 1 --pin-cpus epd=0 --no-prefix-caching")
    p.add_argument("--before", help="git revision to profile first, for a before/after pair")
    p.add_argument("--out", default="bench-image-profile")
    args = p.parse_args()
    from serving.config import default_model_dir
    from serving.engine.models.builder import ensure_model

    model = str(ensure_model(default_model_dir("small"), "small"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    if args.before:
        with checkout(args.before) as tree:
            tables.append((f"before: {args.before}", profile(args, model, out / "before", tree)))
    tables.append(("this tree", profile(args, model, out / "after", None)))
    for label, rows in tables:
        print_table(args, label, rows)


def profile(args: argparse.Namespace, model: str, out: Path, source: Path | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    serve = ["--model", model, "--dtype", args.dtype, *args.serve_args.split()]
    log = Path(tempfile.gettempdir()) / "image-profile-epd.log"
    proc, url = start_server(serve, log, source=source)
    rows = {}
    try:
        for c in (int(c) for c in args.concurrency.split(",")):
            measured, warmup = max(args.requests, 2 * c), min(c, 4)
            ns = SimpleNamespace(
                base_url=f"{url}/v1", model=Path(model).name, api_key=None, workload=args.workload,
                image_repeat_ratio=None, mm_bucket=None, rate=None, rates=None, concurrency=c,
                arrival="poisson", burstiness=1.0, num_requests=measured, duration=None, warmup=warmup,
                seed=1000 + c, slo="ttft=2,tpot=0.2", out=str(out / f"c{c}.json"), no_progress=True,
            )  # fmt: skip
            before = scrape(url)
            summary = bench(ns)[0]["summary"]
            rows[c] = (means(before, scrape(url), measured + warmup), summary)
    finally:
        stop_server(proc)
    return rows


def print_table(args: argparse.Namespace, label: str, rows: dict) -> None:
    print(f"\n==== TTFT by stage, mean ms per request ({args.workload}, {args.dtype}, {label}) ====")
    print(f"serve: {args.serve_args}")
    names = [name for name, _, _ in PARTS] + ["other"]
    print("| concurrency | client TTFT p50 | server TTFT | " + " | ".join(names) + " | tok/s | TPOT p50 |")
    print("|---:" * (len(names) + 5) + "|")
    for c, (m, s) in rows.items():
        parts = " | ".join(f"{m[name] * 1000:.0f}" for name in names)
        print(
            f"| {c} | {s['ttft_s']['p50'] * 1000:.0f} | {m['ttft'] * 1000:.0f} | {parts} "
            f"| {s['output_token_throughput']:.1f} | {s['tpot_s']['p50'] * 1000:.1f} |"
        )


if __name__ == "__main__":
    main()
