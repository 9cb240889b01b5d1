"""Simulated requests: what each asks of the stages (tokens), from the load generator's workloads or
traces, and shifting traces (a mix that changes over time) for the controller benchmarks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadgen.workloads import WorkloadRequest
from loadgen.workloads import load as load_workload
from serving.controller.observation import Kind


@dataclass(frozen=True)
class Tokens:
    """How the engine counts a request: prompt words and image sizes to tokens (from the profile)."""

    tokens_per_word: float = 1.3
    chat_overhead_tokens: int = 20  # the chat template's own tokens
    patch: int = 14
    merge: int = 2
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 64

    def image_tokens(self, width: int, height: int) -> int:
        from serving.engine.image_processor import smart_resize

        factor = self.patch * self.merge
        h, w = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        return (h // factor) * (w // factor)


@dataclass(frozen=True)
class SimRequest:
    index: int
    arrival: float
    prompt_tokens: int  # image tokens included
    image_tokens: int
    output_tokens: int

    @property
    def kind(self) -> Kind:
        return Kind.IMAGE if self.image_tokens else Kind.TEXT


def from_workload(
    requests: Sequence[WorkloadRequest], arrivals: Sequence[float], tokens: Tokens
) -> list[SimRequest]:
    out = []
    for i, (req, at) in enumerate(zip(requests, arrivals, strict=True)):
        image = sum(tokens.image_tokens(w, h) for w, h in req.image_sizes)
        words = len(req.prompt.split())
        prompt = round(words * tokens.tokens_per_word) + tokens.chat_overhead_tokens + image
        out.append(SimRequest(i, float(at), prompt, image, req.output_tokens))
    return out


@dataclass(frozen=True)
class Phase:
    """`duration_s` of Poisson arrivals at `rate` from the preset `workload`."""

    workload: str
    rate: float
    duration_s: float


def shifting(phases: Sequence[Phase], seed: int = 0) -> list[WorkloadRequest]:
    """A trace whose mix changes phase by phase (arrival times set): replayable by `epd bench
    --workload trace:FILE` after `write_trace`, and by the simulator."""
    rng = np.random.default_rng(seed)
    out: list[WorkloadRequest] = []
    start = 0.0
    for k, ph in enumerate(phases):
        n = max(int(rng.poisson(ph.rate * ph.duration_s)), 1)
        times = np.sort(rng.uniform(start, start + ph.duration_s, n))
        for req, at in zip(load_workload(ph.workload, n, seed + 1000 * k), times, strict=True):
            out.append(
                WorkloadRequest(req.prompt, req.image_sizes, req.output_tokens, req.image_seeds, float(at))
            )
        start += ph.duration_s
    return out


def parse_phases(text: str) -> list[Phase]:
    """'text:2:60,image-heavy:3:60' → phases (workload:rate:seconds, comma separated)."""
    out = []
    for part in text.split(","):
        name, rate, dur = part.rsplit(":", 2)
        out.append(Phase(name, float(rate), float(dur)))
    return out


def write_trace(requests: Sequence[WorkloadRequest], path: str | Path) -> None:
    lines = [
        json.dumps(
            {
                "arrival": r.arrival,
                "prompt": r.prompt,
                "image_sizes": [list(s) for s in r.image_sizes],
                "output_tokens": r.output_tokens,
            }
        )
        for r in requests
    ]
    Path(path).write_text("\n".join(lines) + "\n")
