"""`epd model train`: the shapes-world model, trained here on CPU (resumable: run it again to go on)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from serving.training.recipe import Recipe

# The flags that set a recipe field of the same name (over --recipe's, where given).
_FLAGS = ("preset", "steps", "batch_size", "seed", "threads", "checkpoint_every")


def recipe_from_file(path: Path) -> Recipe:
    """A recipe from JSON: its fields at the top level, or under "recipe" (a training.json). A file
    that is not one ends the command with a line saying why, not a traceback."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--recipe {path}: {e}") from None
    data = data.get("recipe", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise SystemExit(f"--recipe {path}: expected a JSON object of recipe fields")
    unknown = sorted(set(data) - {f.name for f in fields(Recipe)})
    if unknown:
        raise SystemExit(f"--recipe {path}: not recipe fields: {', '.join(unknown)}")
    return Recipe(**data)


def add_train_parser(model_sub: Any) -> None:
    p = model_sub.add_parser(
        "train",
        help="train the shapes-world model (a small Qwen2-VL) on this machine's CPUs",
        description="Deterministic for its seed; interrupted runs resume from OUT/checkpoint.pt.",
    )
    # Unset flags leave the recipe's field (the default recipe's, or --recipe's).
    p.add_argument("--preset", choices=["shapes"], help=f"default {Recipe.preset}")
    p.add_argument("--out", required=True, help="model directory to write (Hugging Face format)")
    p.add_argument("--steps", type=int, help=f"default {Recipe.steps}")
    p.add_argument("--batch-size", type=int, help=f"default {Recipe.batch_size}")
    p.add_argument("--seed", type=int, help=f"weight initialisation, default {Recipe.seed}")
    p.add_argument("--threads", type=int, help=f"default {Recipe.threads}")
    p.add_argument("--checkpoint-every", type=int, help=f"default {Recipe.checkpoint_every}")
    p.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long")
    p.add_argument(
        "--init",
        metavar="DIR",
        help="start at the readout stage from this trained model directory's weights and record",
    )
    p.add_argument(
        "--recipe",
        metavar="JSON",
        help="the recipe's fields from this file (a recipe, or a trained model's training.json, whose "
        "recipe it takes: reruns that run); the flags above still apply over it",
    )
    p.set_defaults(func=cmd_train)


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    base = Recipe() if args.recipe is None else recipe_from_file(Path(args.recipe))
    return replace(base, **{k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None})


def cmd_train(args: argparse.Namespace) -> None:
    from serving.training.trainer import train

    print(train(args.out, recipe_from_args(args), args.max_minutes, args.init))
