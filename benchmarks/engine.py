"""Engine benchmark on the `small` preset: decode throughput at several concurrencies against
transformers' generate (one request at a time), encode images/s and prefill tokens/s. Every figure is
measured in this run, side by side."""

from __future__ import annotations

import argparse
import time

import torch

from serving.config import EngineConfig, default_model_dir
from serving.engine.llm import LLMEngine
from serving.engine.models.builder import ensure_model
from serving.types import SamplingParams
from tests.conftest import make_image

OUTPUT_TOKENS = 64


def decode_throughput(engine: LLMEngine, concurrency: int) -> tuple[float, float]:
    """(end-to-end output tok/s, decode-step-only tok/s) for `concurrency` requests run together."""
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    for i in range(concurrency):
        engine.add_request(
            engine.inputs.from_user_prompt(f"Request number {i}: tell me a story.", []), params
        )
    tokens = decode_tokens = 0
    decode_time = 0.0
    start = time.perf_counter()
    while engine.has_unfinished():
        decoding = not engine.scheduler.waiting
        t0 = time.perf_counter()
        deltas = engine.step()
        if decoding:
            decode_time += time.perf_counter() - t0
            decode_tokens += len(deltas)
        tokens += len(deltas)
    return tokens / (time.perf_counter() - start), decode_tokens / decode_time


def hf_throughput(model_dir: str, engine: LLMEngine, requests: int) -> float:
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [
        engine.inputs.from_user_prompt(f"Request number {i}: tell me a story.", []) for i in range(requests)
    ]
    start = time.perf_counter()
    produced = 0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p.token_ids])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT_TOKENS,
                min_new_tokens=OUTPUT_TOKENS, do_sample=False,
            )  # fmt: skip
            produced += out.shape[1] - ids.shape[1]
    return produced / (time.perf_counter() - start)


def encode_rate(engine: LLMEngine, batch: int, side: int, repeats: int = 3) -> tuple[float, float]:
    """(images/s, ms per batch) for batches of `batch` images of side×side pixels."""
    images = [engine.inputs.image_processor(make_image(side, side, seed=i)) for i in range(batch)]
    engine.runner.encode(images)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        engine.runner.encode(images)
    elapsed = (time.perf_counter() - start) / repeats
    return batch / elapsed, elapsed * 1000


def prefill_rate(engine: LLMEngine, batch: int, words: int, repeats: int = 3) -> tuple[float, float, int]:
    """(tokens/s, ms per batch, tokens per prompt) for a prefill batch of text prompts."""
    prompts = [
        engine.inputs.from_user_prompt(" ".join(["picture"] * words) + f" {i}", []) for i in range(batch)
    ]
    n_tokens = sum(len(p.token_ids) for p in prompts)
    elapsed = 0.0
    for rep in range(repeats + 1):
        seqs = [
            engine.make_sequence(f"bench-{rep}-{i}", p, SamplingParams(max_tokens=1))
            for i, p in enumerate(prompts)
        ]
        start = time.perf_counter()
        engine.runner.prefill(seqs)
        if rep:  # the first pass warms up
            elapsed += time.perf_counter() - start
        for s in seqs:
            engine.runner.pool.free(s.block_table)
    elapsed /= repeats
    return n_tokens / elapsed, elapsed * 1000, n_tokens // batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--hf-requests", type=int, default=4)
    args = parser.parse_args()
    model_dir = str(ensure_model(default_model_dir(args.preset), args.preset))
    engine = LLMEngine(EngineConfig(model=model_dir, kv_cache_memory_gb=1.0, max_num_seqs=64))
    params = sum(p.numel() for p in engine.runner.model.parameters())
    print(f"model: epd-{args.preset}, {params / 1e6:.1f}M parameters, {engine.runner.dtype}, "
          f"{engine.runner.device}, torch threads {torch.get_num_threads()}")  # fmt: skip

    hf = hf_throughput(model_dir, engine, args.hf_requests)
    print(f"\nDecode, {OUTPUT_TOKENS} output tokens per request (short text prompts)")
    print(f"{'concurrency':>11} | {'ours e2e tok/s':>14} | {'ours decode-step tok/s':>22} | "
          f"{'HF generate tok/s':>17} | {'e2e ratio':>9}")  # fmt: skip
    for concurrency in (1, 8, 32):
        e2e, step_only = decode_throughput(engine, concurrency)
        print(f"{concurrency:>11} | {e2e:>14.1f} | {step_only:>22.1f} | {hf:>17.1f} | {e2e / hf:>8.2f}x")
    print("(HF generate runs one request at a time, so its rate does not depend on concurrency.)")

    print("\nEncode (vision tower + merger)")
    print(f"{'batch':>5} | {'image':>7} | {'images/s':>8} | {'ms/batch':>8}")
    for batch, side in ((1, 224), (8, 224), (1, 448)):
        rate, ms = encode_rate(engine, batch, side)
        print(f"{batch:>5} | {side}x{side} | {rate:>8.1f} | {ms:>8.1f}")

    print("\nPrefill (text prompts)")
    print(f"{'batch':>5} | {'tokens/prompt':>13} | {'tokens/s':>8} | {'ms/batch':>8}")
    for batch, words in ((1, 120), (8, 120), (1, 500)):
        rate, ms, per = prefill_rate(engine, batch, words)
        print(f"{batch:>5} | {per:>13} | {rate:>8.0f} | {ms:>8.1f}")


if __name__ == "__main__":
    main()
