"""Structured outputs: what a grammar costs. Printed, not asserted.

python -m benchmarks.structured_outputs [--model-preset small] [--steps 64]

1. The grammar libraries on this machine, with the model's tokenizer: compile time per schema and the
   mean time to compute one step's token mask, along a sampled walk through each grammar. llguidance
   always; xgrammar too when it is importable (it is not a dependency: `pip install xgrammar` into a
   scratch directory and put it on PYTHONPATH to compare).
2. The engine's output tokens/s and time per step at 1 and 16 concurrent requests, with and without a
   JSON schema, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from serving.api.grammars import output_grammar
from serving.api.requests import OutputFormat, OutputKind
from serving.config import EngineConfig
from serving.engine import structured
from serving.engine.inputs import Prompt
from serving.engine.llm import LLMEngine
from serving.engine.models.builder import build_model
from serving.types import SamplingParams

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "invoice": {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "maxLength": 8},
                    "lines": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "item": {"type": "string", "maxLength": 10},
                                "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                                "price": {"type": "number", "minimum": 0},
                            },
                            "required": ["item", "qty", "price"],
                            "additionalProperties": False,
                        },
                        "maxItems": 5,
                    },
                    "paid": {"type": "boolean"},
                },
                "required": ["id", "lines", "paid"],
                "additionalProperties": False,
            }
        },
        "required": ["invoice"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {
            "colour": {"enum": ["red", "green", "blue", "yellow"]},
            "shape": {"enum": ["circle", "square", "triangle"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 5},
        },
        "required": ["colour", "shape", "count"],
        "additionalProperties": False,
    },
}
# The throughput run's schema: 24 strings, longer than the tokens each request may write, so every
# step of both runs samples (the constrained one under the grammar) and both write the same count.
NAME = {"type": "string", "maxLength": 8}
LONG = {
    "type": "object",
    "properties": {"names": {"type": "array", "items": NAME, "minItems": 24, "maxItems": 24}},
    "required": ["names"],
    "additionalProperties": False,
}
MAX_TOKENS = 96


def walk_llguidance(
    model_dir: Path, vocab: int, eos: tuple[int, ...], schema: dict, steps: int
) -> tuple[float, float]:
    tokenizer = structured.load_tokenizer(model_dir, vocab, eos)
    grammar = output_grammar(OutputFormat(OutputKind.JSON_SCHEMA, schema))
    t0 = time.perf_counter()
    matcher = structured.new_matcher(tokenizer, grammar)
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        mask = structured.allowed_mask([matcher], vocab)[0]
        times.append(time.perf_counter() - t0)
        allowed = torch.nonzero(mask).flatten().tolist()
        if not allowed or matcher.is_stopped():
            break
        structured.consume(matcher, int(rng.choice(allowed)))
    return compile_s, statistics.mean(times)


def walk_xgrammar(
    model_dir: Path, vocab: int, eos: tuple[int, ...], schema: dict, steps: int
) -> tuple[float, float] | None:
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return None
    hf = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=list(eos))
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t0
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        if matcher.is_terminated():
            break
        t0 = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[0, :vocab]
        times.append(time.perf_counter() - t0)
        allowed = np.flatnonzero(bits)
        if not len(allowed):
            break
        matcher.accept_token(int(rng.choice(allowed)))
    return compile_s, statistics.mean(times)


def throughput(engine: LLMEngine, concurrency: int, schema: bool) -> tuple[float, float]:
    """(output tokens/s, ms per engine step) for `concurrency` requests decoding together."""
    prompt = Prompt(engine.tokenizer.encode_chat([{"role": "user", "content": "List twelve names."}]))
    grammar = output_grammar(OutputFormat(OutputKind.JSON_SCHEMA, LONG)) if schema else None
    for i in range(concurrency):
        params = SamplingParams(
            max_tokens=MAX_TOKENS, temperature=1.0, seed=i, grammar=grammar, ignore_eos=True
        )
        engine.add_request(prompt, params)
    tokens = steps = 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(d.token_ids) for d in engine.step())
        steps += 1
    wall = time.perf_counter() - t0
    return tokens / wall, wall / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-preset", default="small")
    parser.add_argument("--steps", type=int, default=64, help="mask steps per schema walk")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "m", args.model_preset)
        engine = LLMEngine(EngineConfig(model=str(model_dir)))
        cfg = engine.model_config
        vocab, eos = cfg.text.vocab_size, cfg.eos_token_ids
        print(f"grammar libraries, {args.model_preset} tokenizer ({vocab} tokens), one thread:")
        print(f"{'schema':>8} {'library':>11} {'compile ms':>11} {'mask µs/step':>13}")
        for name, schema in SCHEMAS.items():
            rows = [("llguidance", walk_llguidance(model_dir, vocab, eos, schema, args.steps))]
            rows.append(("xgrammar", walk_xgrammar(model_dir, vocab, eos, schema, args.steps)))
            for library, result in rows:
                if result is None:
                    print(f"{name:>8} {library:>11} {'(not installed)':>25}")
                    continue
                print(f"{name:>8} {library:>11} {result[0] * 1e3:>11.2f} {result[1] * 1e6:>13.1f}")
        print(f"\nengine decode, {args.model_preset}, one thread, {MAX_TOKENS} tokens a request:")
        header = ("requests", "free tok/s", "schema tok/s", "ratio", "free ms/step", "schema ms/step")
        print("".join(f"{h:>15}" for h in header))
        for concurrency in (1, 16):
            free = throughput(engine, concurrency, False)
            constrained = throughput(engine, concurrency, True)
            row = (concurrency, free[0], constrained[0], constrained[0] / free[0], free[1], constrained[1])
            print(f"{row[0]:>15}" + "".join(f"{v:>15.2f}" for v in row[1:]))


if __name__ == "__main__":
    main()
