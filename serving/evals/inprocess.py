"""`epd eval --in-process`: the items through the engine in this process, no server. The prompt is the
chat template's rendering of the same one user message a served request carries."""

from __future__ import annotations

import time

from serving.config import EngineConfig
from serving.engine.llm import LLMEngine
from serving.evals.report import Outcome, Report
from serving.evals.requests import MAX_TOKENS
from serving.evals.tasks import Item
from serving.types import SamplingParams

BATCH = 16  # requests run together: the engine batches their prefills and decodes


def evaluate_in_process(
    model_dir: str,
    items: list[Item],
    seed: int,
    dtype: str = "float32",
    pruning: tuple[float, float] = (0.0, 0.0),
    **settings: str,
) -> Report:
    """`pruning`: the (image, video) pruning rates at the encoder; `settings`: other engine settings
    (the pruning methods)."""
    engine = LLMEngine(EngineConfig(model=model_dir, dtype=dtype, **settings))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    for at in range(0, len(items), BATCH):
        chunk = items[at : at + BATCH]
        prompts = [
            engine.inputs.from_user_prompt(
                i.prompt, [i.frames() if i.kind == "video" else i.image()], pruning
            )
            for i in chunk
        ]
        results = engine.generate([(p, params) for p in prompts])
        for item, prompt, result in zip(chunk, prompts, results, strict=True):
            outcomes.append(Outcome(item.task, item.index, item.answer, result.text, len(prompt.token_ids)))
    return Report(model_dir, seed, "in-process", outcomes, time.perf_counter() - start)
