"""epd-shapes through every topology against the in-process engine: accuracy per task (Wilson 95 %),
items/s through the server, and how many served replies equal the in-process ones item for item.

    python -m benchmarks.shapes_topologies [--n 100] [--seed 2026] [--topologies e+p+d,epd,ep+d,e+pd]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from loadgen.server import start_server, stop_server
from serving.config import default_model
from serving.evals.inprocess import evaluate_in_process
from serving.evals.served import evaluate_served
from serving.evals.tasks import TASKS, items

SERVED_TASKS = [t for t in TASKS if t != "motion"]  # video_url is not served yet


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--topologies", default="e+p+d,epd,ep+d,e+pd")
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    model = str(default_model())
    local = evaluate_in_process(model, items(args.seed, list(TASKS), args.n), args.seed)
    print(local.table())
    expected = [o for o in local.outcomes if o.task in SERVED_TASKS]
    chosen = items(args.seed, SERVED_TASKS, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        for topology in args.topologies.split(","):
            proc, url = start_server(
                ["--model", model, "--topology", topology], Path(tmp) / f"{topology}.log"
            )
            try:
                report = asyncio.run(
                    evaluate_served(
                        f"{url}/v1", "epd-shapes", chosen, args.seed, concurrency=args.concurrency
                    )
                )
            finally:
                stop_server(proc)
            same = sum(a.reply == b.reply for a, b in zip(report.outcomes, expected, strict=True))
            print(f"\n---- served, {topology}: {same} of {len(expected)} replies equal the in-process ones")
            print(report.table())


if __name__ == "__main__":
    main()
