"""Workloads: what each request asks for (prompt, images, output length), from presets or a trace."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

_WORDS = (
    "image picture scene color shape object person tree sky road house animal light shadow "
    "left right top bottom describe count compare detail texture background foreground"
).split()  # noqa: SIM905


@dataclass(frozen=True)
class WorkloadRequest:
    prompt: str
    image_sizes: tuple[tuple[int, int], ...]
    output_tokens: int
    image_seeds: tuple[int, ...] = ()  # equal seeds and sizes → byte-identical images (cache hits)
    arrival: float | None = None  # trace replay: seconds from the start
    media_urls: tuple[str, ...] = ()  # ready data URLs (the shapes workload), sent before the prompt
    answer: str | None = None  # the known right answer: the reply is scored (the shapes workload)


@dataclass(frozen=True)
class Synthetic:
    """Distributions of a synthetic multimodal workload."""

    images_per_request: tuple[int, ...]  # drawn uniformly from these counts
    image_sizes: tuple[tuple[int, int], ...]
    prompt_words: tuple[int, int]
    output_tokens: tuple[int, int]
    repeat_ratio: float = 0.0  # share of images drawn from a small reused pool
    pool: int = 8


PRESETS = {
    "image-heavy": Synthetic((1, 2, 3), ((224, 224), (336, 336), (448, 448), (448, 336)), (20, 60), (16, 48)),
    "mixed": Synthetic((0, 0, 1, 2), ((224, 224), (448, 448), (336, 224)), (20, 200), (16, 128)),
    "text": Synthetic((0,), ((224, 224),), (50, 400), (32, 128)),
}


def synthetic(spec: Synthetic, n: int, seed: int = 0) -> list[WorkloadRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        count = int(rng.choice(spec.images_per_request))
        sizes = tuple(
            tuple(int(v) for v in spec.image_sizes[rng.integers(len(spec.image_sizes))]) for _ in range(count)
        )
        seeds = tuple(
            int(rng.integers(spec.pool)) if rng.random() < spec.repeat_ratio else 1_000_000 + i * 16 + j
            for j in range(count)
        )
        words = int(rng.integers(spec.prompt_words[0], spec.prompt_words[1] + 1))
        prompt = " ".join(rng.choice(_WORDS, words)) + f" (request {i})"
        tokens = int(rng.integers(spec.output_tokens[0], spec.output_tokens[1] + 1))
        out.append(WorkloadRequest(prompt, sizes, tokens, seeds))
    return out


def from_trace(path: str | Path) -> list[WorkloadRequest]:
    """JSONL, one request a line:
    {"arrival": s, "prompt": str, "image_sizes": [[w, h], ...], "output_tokens": n}."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        sizes = tuple(tuple(s) for s in row.get("image_sizes", []))
        out.append(
            WorkloadRequest(
                row["prompt"],
                sizes,
                int(row["output_tokens"]),
                tuple(2_000_000 + i * 16 + j for j in range(len(sizes))),
                float(row["arrival"]),
            )
        )
    return out


# The image tasks; `motion` needs video input on the server.
SHAPES_TASKS = ("colour", "shape", "count", "count_colour", "side", "read")
SHAPES_SEED = 4242  # never the training seed: these items are held out


def shapes(n: int, seed: int = 0) -> list[WorkloadRequest]:
    """Shapes-world items, the tasks in turn: each request carries its item's image, its question and
    the right answer, so the report can say how many answers were right under load."""
    from serving.evals.requests import MAX_TOKENS, data_url
    from serving.evals.tasks import item

    out = []
    for i in range(n):
        it = item(SHAPES_SEED + seed, SHAPES_TASKS[i % len(SHAPES_TASKS)], i // len(SHAPES_TASKS))
        out.append(WorkloadRequest(it.prompt, (), MAX_TOKENS, media_urls=(data_url(it),), answer=it.answer))
    return out


def load(name: str, n: int, seed: int = 0, repeat_ratio: float | None = None) -> list[WorkloadRequest]:
    if name.startswith("trace:"):
        return from_trace(name.removeprefix("trace:"))
    if name == "shapes":
        return shapes(n, seed)
    if name not in PRESETS:
        raise ValueError(f"unknown workload {name!r}; choose {sorted([*PRESETS, 'shapes'])} or trace:PATH")
    spec = PRESETS[name]
    if repeat_ratio is not None:
        spec = Synthetic(**{**spec.__dict__, "repeat_ratio": repeat_ratio})
    return synthetic(spec, n, seed)


@dataclass
class ImageMaker:
    """PNG data URLs for a request's images; each (size, seed) is made once and reused."""

    cache: dict[tuple[int, int, int], str] = field(default_factory=dict)

    def data_url(self, size: tuple[int, int], seed: int) -> str:
        key = (*size, seed)
        if key not in self.cache:
            rng = np.random.default_rng(seed)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            self.cache[key] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return self.cache[key]
