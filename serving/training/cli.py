"""`epd model train`: the shapes-world model, trained here on CPU (resumable: run it again to go on)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from serving.training.recipe import Recipe


def add_train_parser(model_sub: Any) -> None:
    p = model_sub.add_parser(
        "train",
        help="train the shapes-world model (a small Qwen2-VL) on this machine's CPUs",
        description="Deterministic for its seed; interrupted runs resume from OUT/checkpoint.pt.",
    )
    p.add_argument("--preset", choices=["shapes"], default="shapes")
    p.add_argument("--out", required=True, help="model directory to write (Hugging Face format)")
    p.add_argument("--steps", type=int, default=Recipe.steps)
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--seed", type=int, default=Recipe.seed, help="weight initialisation")
    p.add_argument("--threads", type=int, default=Recipe.threads)
    p.add_argument("--checkpoint-every", type=int, default=Recipe.checkpoint_every)
    p.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long")
    p.add_argument(
        "--init",
        metavar="DIR",
        help="start at the readout stage from this trained model directory's weights and record",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> None:
    from serving.training.trainer import train

    recipe = replace(
        Recipe(),
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        threads=args.threads,
        checkpoint_every=args.checkpoint_every,
    )
    print(train(args.out, recipe, args.max_minutes, args.init))
