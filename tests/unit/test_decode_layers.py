"""A decode step's layers as one C call (`decode_layers.c`) give the layer modules' logits and keys and
values to the bit, run only where every kernel they chain would, and hand a failure back to the
modules."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from serving.config import EngineConfig
from serving.engine.kernels.decode_layers import address
from serving.engine.llm import LLMEngine
from serving.engine.models import cpu_linear
from serving.engine.models.decode_layers import DecodeLayers
from serving.types import SamplingParams

DTYPES = ["float32", "bfloat16"]


def engine_for(model: Path, dtype: str) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(
            model=str(model), dtype=dtype, num_kv_blocks=128, block_size=4, enable_prefix_caching=False
        )
    )
    if engine.runner.model.model.decode_layers is None:
        pytest.skip(f"the decode kernels do not all run {dtype} on this CPU")
    return engine


def requests(engine: LLMEngine, n: int, tokens: int = 12) -> list:
    """Prompts of different lengths (contexts cross block boundaries at different steps), seeded sampling."""
    proto = engine.inputs.from_user_prompt("x", [])
    vocab = engine.model_config.text.vocab_size - 64
    return [
        (
            type(proto)([7 + (i * 31 + j * 5) % vocab for j in range(9 + 13 * i)]),
            SamplingParams(max_tokens=tokens, temperature=0.9, seed=i),
        )
        for i in range(n)
    ]


def run(engine: LLMEngine, reqs: list) -> tuple[list[list[int]], list[torch.Tensor], torch.Tensor]:
    """Tokens, every step's logits, and the KV pool after the run (blocks freed but not cleared)."""
    model = engine.runner.model
    recorded: list[torch.Tensor] = []
    logits = model.logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        recorded.append(logits(hidden))
        return recorded[-1]

    model.logits = recording
    try:
        results = engine.generate(reqs)
    finally:
        del model.logits
    return [r.token_ids for r in results], recorded, engine.runner.pool.data.clone()


def modules_only(model: Path, dtype: str) -> LLMEngine:
    """A second engine, fresh like the first (so its blocks are allocated alike), without the call."""
    engine = engine_for(model, dtype)
    engine.runner.model.model.decode_layers = None
    return engine


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 5])
def test_one_call_gives_the_modules_logits_and_kv_to_the_bit(tiny_model, dtype, batch, threads) -> None:
    engine = engine_for(tiny_model, dtype)
    fast = engine.runner.model.model.decode_layers
    if threads > 1 and not fast.parallel:
        pytest.skip("the few-row kernel was built without OpenMP: several threads take the modules")
    reqs = requests(engine, batch)
    tokens, logits, pool = run(engine, reqs)
    assert fast.calls == 11  # every step after the first (12 tokens, prompts prefilled in one step)
    want_tokens, want_logits, want_pool = run(modules_only(tiny_model, dtype), reqs)
    assert tokens == want_tokens
    assert len(logits) == len(want_logits)
    assert all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))
    assert torch.equal(pool, want_pool)
    assert len({t for ts in tokens for t in ts}) >= 4  # a sampler stuck on one token would prove little


def test_steps_it_does_not_take_run_the_modules(tiny_model, monkeypatch, one_thread) -> None:
    """Steps with prompt tokens, more rows than the few-row kernel takes, and several threads where the
    kernel has no OpenMP: the modules run them."""
    engine = engine_for(tiny_model, "float32")
    fast = engine.runner.model.model.decode_layers
    engine.generate(requests(engine, 2, tokens=1))  # prefill only: no decode step at all
    assert fast.calls == 0
    monkeypatch.setattr(cpu_linear, "FEW_ROWS", 2)
    engine.generate(requests(engine, 3, tokens=4))  # three rows per decode step
    assert fast.calls == 0
    engine.generate(requests(engine, 2, tokens=4))
    assert fast.calls == 3
    torch.set_num_threads(2)
    monkeypatch.setattr(fast, "parallel", False)
    engine.generate(requests(engine, 2, tokens=4))
    assert fast.calls == 3


def test_a_failed_attention_call_hands_the_step_back_to_the_modules(tiny_model, one_thread) -> None:
    """The attention kernel's nonzero status (out of memory, a thread that did not start) returns the
    step to the modules, which write the same keys and values again: the outputs are unchanged."""
    engine = engine_for(tiny_model, "float32")
    fast = engine.runner.model.model.decode_layers
    reqs = requests(engine, 3)
    want_tokens, want_logits, want_pool = run(modules_only(tiny_model, "float32"), reqs)

    failures: list[int] = []
    attend_type = ctypes.CFUNCTYPE(
        ctypes.c_int, *([ctypes.c_void_p] * 2), ctypes.c_int, *([ctypes.c_int64] * 3)
    )

    @attend_type
    def failing(*args):  # noqa: ANN002, ANN202 - a C callback: only the first arguments are declared
        failures.append(1)
        return 1

    fast._ops.attend = address(failing)
    tokens, logits, pool = run(engine, reqs)
    assert len(failures) == 11 and fast.calls == 0  # tried every decode step, finished none
    assert tokens == want_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))
    assert torch.equal(pool, want_pool)


def test_not_bound_where_a_layer_lacks_the_few_row_kernel(tiny_model) -> None:
    engine = engine_for(tiny_model, "float32")
    decoder = engine.runner.model.model
    assert DecodeLayers.build(decoder) is not None
    decoder.layers[1].mlp.down_proj.few_rows = None  # e.g. no memory for its copy
    assert DecodeLayers.build(decoder) is None
    bf = engine_for(tiny_model, "bfloat16").runner.model.model
    bf.norm.weight.data = bf.norm.weight.data.float()  # a norm in another dtype than the linears
    assert DecodeLayers.build(bf) is None
