"""Embedding-cache hit rate with two encode workers, without and with content affinity, side by side.
Printed, not asserted.

python -m benchmarks.affinity [--requests 64] [--concurrency 8] [--repeat-ratio 0.5]

The image-heavy workload with `--repeat-ratio` of its images drawn from a small reused pool (as
`epd bench --image-repeat-ratio`; the pool larger than its default 8, so that which worker holds an
item matters for longer), run through a local `e+pd` deployment of the tiny model with two
encode workers: once with least-loaded routing alone, once with affinity (the request's media hashed
to a worker, within a bounded load). The hit rate is hits over lookups on both encoders.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from loadgen.workloads import PRESETS, synthetic
from serving.cluster import Cluster
from serving.control.directory import PoolDirectory
from serving.engine.inputs import InputProcessor
from serving.engine.models.builder import build_model
from serving.pipeline import Request
from serving.types import Role, SamplingParams


def image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def run(cluster: Cluster, requests: list[Request], concurrency: int) -> tuple[float, float, dict[str, int]]:
    encoders = [e.name for e in cluster.directory.entries() if Role.ENCODE in e.roles]
    before = cluster.stats_now()
    gate = asyncio.Semaphore(concurrency)

    async def one(r: Request) -> None:
        async with gate:
            async for _ in cluster.pipeline.run(r):
                pass

    async def all_of() -> None:
        await asyncio.gather(*(one(r) for r in requests))

    t0 = time.perf_counter()
    cluster.plane.run(all_of())
    wall = time.perf_counter() - t0
    after = cluster.stats_now()
    hits = sum(after[n].mm_cache_hits - before[n].mm_cache_hits for n in encoders)
    misses = sum(after[n].mm_cache_misses - before[n].mm_cache_misses for n in encoders)
    share = {
        n: after[n].mm_cache_hits
        + after[n].mm_cache_misses
        - before[n].mm_cache_hits
        - before[n].mm_cache_misses
        for n in encoders
    }
    return hits / max(1, hits + misses), wall, share


_KEYED_PICK = PoolDirectory.pick


def _least_loaded(
    self: PoolDirectory, role: Role, exclude: frozenset[str] = frozenset(), key: str | None = None
) -> object:
    return _KEYED_PICK(self, role, exclude)  # the key dropped: routing by load alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat-ratio", type=float, default=0.5)
    parser.add_argument("--pool", type=int, default=48, help="distinct reused images (per size)")
    parser.add_argument("--images", type=int, default=0, help="images per request (0: the preset's 1-3)")
    args = parser.parse_args()
    per_request = (args.images,) if args.images else PRESETS["image-heavy"].images_per_request
    spec = replace(
        PRESETS["image-heavy"],
        images_per_request=per_request,
        image_sizes=((112, 112), (168, 112)),
        output_tokens=(2, 2),
        repeat_ratio=args.repeat_ratio,
        pool=args.pool,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "m", "tiny")
        inputs = InputProcessor.from_dir(str(model))
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        rows = []
        for label, affinity in (("least loaded", False), ("affinity", True)):
            cluster = Cluster.start(
                str(model), "e+pd", encode=2, runtime="local", engine=dict(num_kv_blocks=1024)
            )
            try:
                requests = []
                for i, w in enumerate(synthetic(spec, args.requests, seed=7)):
                    pics = [image(s, seed) for s, seed in zip(w.image_sizes, w.image_seeds, strict=True)]
                    prompt, arrays = inputs.spec_from_user_prompt(w.prompt, pics)
                    requests.append(Request(f"{label}-{i}", prompt, params, arrays))
                picker = PoolDirectory.pick if affinity else _least_loaded
                with mock.patch.object(PoolDirectory, "pick", picker):
                    rows.append((label, *run(cluster, requests, args.concurrency)))
            finally:
                cluster.shutdown()
    setting = f"repeat ratio {args.repeat_ratio}, {args.concurrency} concurrent, 2 encoders"
    print(f"{args.requests} image-heavy requests ({per_request} images each), {setting}:")
    for label, rate, wall, share in rows:
        lookups = sorted(share.values())
        print(f"  {label:>13}: encode-cache hit rate {rate:.2f}, lookups per encoder {lookups}, {wall:.1f} s")


if __name__ == "__main__":
    main()
