"""Where an engine step's time goes under closed-loop load (`python -m benchmarks.engine_profile`).

The `small` preset's engine runs in this process on one thread, the way a worker runs it: N requests
in flight (prompts of about 600 tokens, 128 output tokens, ignore_eos), a new one added whenever one
finishes. Named parts of the step are timed by wrapping them; what no part claims is "other" (Python
bookkeeping between them). Prints one table: seconds and share of engine time per part.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from typing import Any

import torch

from serving.config import EngineConfig, default_model_dir
from serving.engine.llm import LLMEngine
from serving.engine.models.builder import ensure_model
from serving.types import SamplingParams

_WORDS = "the a picture of river mountain city night colour light shows bright small old".split()


class Timers:
    """Accumulated wall time per named part; nested parts are charged to the outermost one only."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self._depth -= 1

        setattr(owner, attr, timed)


def instrument(engine: LLMEngine, timers: Timers) -> None:
    import serving.engine.llm as llm_mod
    from serving.engine import attention, scheduler, sequence
    from serving.engine.backends import cpu as cpu_backend
    from serving.engine.kernels import fused
    from serving.engine.models import cpu_linear
    from serving.engine.models.decode_layers import DecodeLayers

    timers.wrap(scheduler.Scheduler, "schedule", "scheduling")
    timers.wrap(attention.AttentionBatch, "build", "batch building (attention metadata)")
    timers.wrap(fused, "write_kv", "attention: KV write")
    timers.wrap(cpu_backend, "_decode_kernel", "attention: decode tokens (in place)")
    timers.wrap(cpu_backend, "_prefill_kernel", "attention: prompt tokens (kernel)")
    timers.wrap(cpu_backend, "attend_padded", "attention: no kernel (gather + batched SDPA)")
    timers.wrap(torch.nn.functional, "linear", "linear layers (matmuls)")
    timers.wrap(cpu_linear.PackedLinear, "forward", "linear layers (matmuls)")
    timers.wrap(DecodeLayers, "__call__", "decode steps' layers as one C call (decode_layers.c)")
    timers.wrap(llm_mod, "sample", "sampling")
    timers.wrap(sequence.Sequence, "append", "detokenize + stop rules")


def prompt_of(engine: LLMEngine, i: int, tokens: int) -> Any:
    words = " ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(tokens))
    prompt = engine.inputs.from_user_prompt(f"request {i}: {words}", [])
    return type(prompt)(prompt.token_ids[: tokens - 8] + prompt.token_ids[-8:])


def run(concurrency: int, total: int, prompt_tokens: int, output_tokens: int, dtype: str = "float32") -> None:
    torch.set_num_threads(1)
    model = str(ensure_model(default_model_dir("small"), "small"))
    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device="cpu"))
    params = SamplingParams(max_tokens=output_tokens, ignore_eos=True)
    engine.generate([(prompt_of(engine, -1, prompt_tokens), SamplingParams(max_tokens=4))])  # warm-up
    timers = Timers()
    instrument(engine, timers)
    sent = done = produced = steps = 0
    step_s = 0.0
    # Which steps were decode-only: the runner's decode fast path marks them.
    from serving.engine.runner import ModelRunner

    decode_only = [False]
    fast = ModelRunner._decode_forward

    def marked(self: ModelRunner, *args: Any) -> Any:
        decode_only[0] = True
        return fast(self, *args)

    ModelRunner._decode_forward = marked  # type: ignore[method-assign]
    kinds: dict[str, list[float]] = {"decode-only": [], "with prompt tokens": []}
    while sent < min(concurrency, total):
        engine.add_request(prompt_of(engine, sent, prompt_tokens), params)
        sent += 1
    start = time.perf_counter()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        decode_only[0] = False
        deltas = engine.step()
        took = time.perf_counter() - t0
        step_s += took
        kinds["decode-only" if decode_only[0] else "with prompt tokens"].append(took)
        steps += 1
        for delta in deltas:
            produced += len(delta.token_ids)
            if delta.finished:
                done += 1
                if sent < total:
                    engine.add_request(prompt_of(engine, sent, prompt_tokens), params)
                    sent += 1
    wall = time.perf_counter() - start
    print(
        f"concurrency {concurrency}, {total} requests x {output_tokens} tokens, prompts {prompt_tokens} "
        f"tokens: {produced / wall:.1f} output tok/s, {steps} steps, {1000 * step_s / steps:.1f} ms/step"
    )
    for kind, times in kinds.items():
        if times:
            ms = sorted(1000 * t for t in times)
            print(f"{kind} steps: {len(ms)}, median {ms[len(ms) // 2]:.1f} ms, total {sum(ms) / 1000:.2f} s")
    print("| part of the engine step | seconds | share |\n|---|---:|---:|")
    claimed = 0.0
    for name, secs in sorted(timers.seconds.items(), key=lambda kv: -kv[1]):
        claimed += secs
        print(f"| {name} | {secs:.2f} | {100 * secs / step_s:.1f} % |")
    other = step_s - claimed
    name = "other (embedding, norms, rotary, Python between parts)"
    print(f"| {name} | {other:.2f} | {100 * other / step_s:.1f} % |")
    print(f"| **engine step total** | {step_s:.2f} | 100 % |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=600)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args()
    run(args.concurrency, args.requests, args.prompt_tokens, args.output_tokens, args.dtype)


if __name__ == "__main__":
    main()
