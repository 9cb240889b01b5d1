"""`epd eval`: shapes-world accuracy of a served model (any OpenAI-compatible server) or in process."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from serving.evals.tasks import TASKS, items
from serving.training.recipe import TRAIN_SEED

DEFAULT_SEED = 2026


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="answer accuracy on the shapes-world tasks, per task with 95 % intervals",
        description="Send each task's items to a server (or the engine in process) and score the answers.",
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="an OpenAI-compatible /v1 URL")
    p.add_argument(
        "--model",
        help="served model name; with --in-process a model directory (default: the shipped epd-shapes)",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--n", type=int, default=100, help="items per task")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="item seed (any but the training seed)")
    p.add_argument("--extra", help="JSON object merged into every request body, e.g. '{\"top_k\": 1}'")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--api-key")
    p.add_argument("--out", help="write the JSON report (every item, its reply and score) here")
    p.add_argument("--in-process", action="store_true", help="run the engine in this process, no server")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="with --in-process")
    p.set_defaults(func=cmd_eval)


def _parse(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    if args.seed == TRAIN_SEED:
        raise ValueError(f"seed {TRAIN_SEED} is the training seed: its items are not held out")
    if args.n < 1 or args.concurrency < 1:
        raise ValueError("--n and --concurrency must be at least 1")
    extra = json.loads(args.extra) if args.extra else {}
    if not isinstance(extra, dict):
        raise ValueError("--extra must be a JSON object")
    if extra and args.in_process:
        raise ValueError("--extra applies to served requests; it has no meaning with --in-process")
    return tasks, extra


def cmd_eval(args: argparse.Namespace) -> None:
    tasks, extra = _parse(args)
    chosen = items(args.seed, tasks, args.n)
    if args.in_process:
        from serving.config import default_model
        from serving.evals.inprocess import evaluate_in_process

        report = evaluate_in_process(args.model or str(default_model()), chosen, args.seed, args.dtype)
    else:
        from serving.evals.served import evaluate_served

        if not args.model:
            raise ValueError("--model (the served model's name) is required without --in-process")
        report = asyncio.run(
            evaluate_served(
                args.base_url, args.model, chosen, args.seed, extra, args.concurrency, args.api_key
            )
        )
    print(report.table())
    if args.out:
        report.write(args.out)
