"""Video requests: TTFT and encode time against the frames sampled and the frame size. Printed, not
asserted.

python -m benchmarks.video_frames [--frames 8,16,32] [--sizes 224x224,336x336,448x448] [--repeats 3]

One `e+p+d` server of the default model on this machine; for each frame size one clip of 16 s at
4 fps (64 frames, H.264), sent alone (concurrency 1) with `media_io_kwargs.video.num_frames` set to
each count, each time a new clip (another seed) so that no cache answers. TTFT is measured by the
client on a streamed request; the encode worker's time, split into the vision tower's
(`epd:stage_duration_seconds{stage="encode"}`) and the rest (`epd:stage_queue_time_seconds`: decoding
the frames and preprocessing them, alone here), and the video's tokens (the usage) come from the
server. Medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import openai

from loadgen.server import start_server, stop_server
from loadgen.workloads import clip_url
from serving.config import default_model

SECONDS, FPS = 16, 4


def encode_seconds(url: str) -> tuple[float, float]:
    """The server's encode-stage totals so far: (vision tower, everything else on the encode worker:
    waiting, decoding the frames, preprocessing)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    sums = {}
    for line in text.splitlines():
        for name in ("epd:stage_duration_seconds_sum{", "epd:stage_queue_time_seconds_sum{"):
            if line.startswith(name) and 'stage="encode"' in line:
                sums[name] = float(line.rsplit(" ", 1)[1])
    return sums.get("epd:stage_duration_seconds_sum{", 0.0), sums.get(
        "epd:stage_queue_time_seconds_sum{", 0.0
    )


def one(
    client: openai.OpenAI, url: str, model: str, clip: str, frames: int
) -> tuple[float, float, float, int]:
    """(TTFT, vision seconds, decode and queue seconds, video tokens) of one streamed request."""
    before = encode_seconds(url)
    content = [{"type": "video_url", "video_url": {"url": clip}}, {"type": "text", "text": "Which way?"}]
    start = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0,
        stream=True, stream_options={"include_usage": True},
        extra_body={"media_io_kwargs": {"video": {"num_frames": frames}}, "ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content is not None:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = (chunk.usage.prompt_tokens_details.model_extra or {}).get("video_tokens", 0)
    after = encode_seconds(url)
    return ttft or float("nan"), after[0] - before[0], after[1] - before[1], tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default="8,16,32")
    p.add_argument("--sizes", default="224x224,336x336,448x448")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    model = str(default_model())
    frame_counts = [int(f) for f in args.frames.split(",")]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(
            ["--model", model, "--topology", "e+p+d", "--video-max-frames", str(max(frame_counts))],
            Path(tmp) / "serve.log",
        )
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600)
            name = Path(model).name
            one(client, url, name, clip_url(64, 64, 8, seed=1), 8)  # warm-up
            rows = []
            seed = 100
            for width, height in sizes:
                for frames in frame_counts:
                    runs = []
                    for _ in range(args.repeats):
                        seed += 1
                        clip = clip_url(width, height, SECONDS * FPS, seed)
                        runs.append(one(client, url, name, clip, frames))
                    ttft = statistics.median(r[0] for r in runs)
                    vision = statistics.median(r[1] for r in runs)
                    decode = statistics.median(r[2] for r in runs)
                    rows.append((f"{width}x{height}", frames, runs[0][3], ttft, vision, decode))
        finally:
            stop_server(proc)
    print(f"\nvideo requests alone, {SECONDS} s clips at {FPS} fps, e+p+d, medians of {args.repeats}:")
    print(f"{'frame size':>10} {'frames':>6} {'tokens':>6} {'TTFT':>8} {'vision':>8} {'decode+queue':>13}")
    for size, frames, tokens, ttft, vision, decode in rows:
        print(f"{size:>10} {frames:>6} {tokens:>6} {ttft:7.3f}s {vision:7.3f}s {decode:12.3f}s")


if __name__ == "__main__":
    main()
