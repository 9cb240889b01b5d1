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


# Every task; `motion` sends its clip as a `video_url`.
SHAPES_TASKS = ("colour", "shape", "count", "count_colour", "side", "read", "motion")
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


VIDEO_FPS = 2  # the clips' frame rate: the server's default sampling takes every frame
VIDEO_BUCKETS = {"224x224x8": 0.5, "336x252x16": 0.5}  # the `video` workload


def parse_buckets(spec: str | dict[str, float]) -> dict[tuple[int, int, int], float]:
    """`{"WxHxF": weight, ...}` (vLLM's random-mm buckets): F = 1 an image, F > 1 a video of F frames."""
    raw = json.loads(spec) if isinstance(spec, str) else spec
    out = {}
    for key, weight in raw.items():
        try:
            w, h, f = (int(v) for v in key.lower().split("x"))
        except ValueError:
            raise ValueError(f"bucket {key!r} is not WIDTHxHEIGHTxFRAMES") from None
        if min(w, h, f) < 1 or not weight > 0:
            raise ValueError(f"bucket {key!r}: sizes, frames and weight must be positive")
        out[(w, h, f)] = float(weight)
    if not out:
        raise ValueError("give at least one bucket")
    return out


def clip_url(width: int, height: int, frames: int, seed: int) -> str:
    """A synthetic clip (a square moving over noise), H.264 in MP4 at `VIDEO_FPS`, as a data URL."""
    from serving.evals.clips import encode_mp4

    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    side = max(8, min(width, height) // 4)
    images = []
    for i in range(frames):
        frame = background.copy()
        x = (i * 7) % max(1, width - side)
        frame[height // 3 : height // 3 + side, x : x + side] = (220, 40, 40)
        images.append(Image.fromarray(frame))
    return "data:video/mp4;base64," + base64.b64encode(encode_mp4(images, VIDEO_FPS)).decode()


def buckets(spec: dict[tuple[int, int, int], float], n: int, seed: int = 0) -> list[WorkloadRequest]:
    """One image or video a request, its bucket drawn by weight; short prompts and outputs."""
    rng = np.random.default_rng(seed)
    keys = list(spec)
    p = np.array([spec[k] for k in keys])
    out = []
    for i in range(n):
        w, h, f = keys[int(rng.choice(len(keys), p=p / p.sum()))]
        words = int(rng.integers(10, 30))
        prompt = " ".join(rng.choice(_WORDS, words)) + f" (request {i})"
        tokens = int(rng.integers(16, 48))
        if f == 1:
            out.append(WorkloadRequest(prompt, ((w, h),), tokens, (3_000_000 + i,)))
        else:
            out.append(WorkloadRequest(prompt, (), tokens, media_urls=(clip_url(w, h, f, 3_000_000 + i),)))
    return out


def load(
    name: str, n: int, seed: int = 0, repeat_ratio: float | None = None, mm_buckets: str | None = None
) -> list[WorkloadRequest]:
    if mm_buckets is not None:
        return buckets(parse_buckets(mm_buckets), n, seed)
    if name.startswith("trace:"):
        return from_trace(name.removeprefix("trace:"))
    if name == "shapes":
        return shapes(n, seed)
    if name == "video":
        return buckets(parse_buckets(VIDEO_BUCKETS), n, seed)
    if name not in PRESETS:
        choices = sorted([*PRESETS, "shapes", "video"])
        raise ValueError(f"unknown workload {name!r}; choose {choices}, trace:PATH or --mm-bucket")
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
