"""`epd profile`: measure the real engine on this machine and fit the costs the simulator and the
controller plan with: encode time vs image tokens, prefill time vs prompt tokens, decode step time vs
batch size, NIXL pull time vs bytes, and how the engine counts tokens (words and image sizes)."""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from serving.controller.model import StageCosts
from serving.sim.workload import Tokens

IMAGE_SIZES = ((224, 224), (336, 336), (448, 448))
PREFILL_TOKENS = (32, 128, 256, 512, 1024)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
TRANSFER_BYTES = (1 << 16, 1 << 20, 1 << 23)


@dataclass
class Profile:
    costs: StageCosts
    tokens: Tokens
    model: str = ""
    machine: str = ""
    threads: int = 1
    samples: dict[str, list[list[float]]] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        data = {**asdict(self), "costs": asdict(self.costs), "tokens": asdict(self.tokens)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        data = json.loads(Path(path).read_text())
        costs = StageCosts(**{k: v for k, v in data["costs"].items() if k in StageCosts.__dataclass_fields__})
        tokens = Tokens(**data.get("tokens", {}))
        return cls(
            costs,
            tokens,
            data.get("model", ""),
            data.get("machine", ""),
            data.get("threads", 1),
            data.get("samples", {}),
        )


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope), both clamped at ≥ 0 (costs are never negative)."""
    x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    slope, intercept = np.polyfit(x, y, 1) if len(set(x)) > 1 else (0.0, float(y.mean()))
    if intercept < 0:
        slope, intercept = float((x * y).sum() / (x * x).sum()), 0.0
    return max(float(intercept), 0.0), max(float(slope), 0.0)


def _median_time(fn, repeats: int) -> float:  # noqa: ANN001 - any callable
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model_dir: str, threads: int = 1, repeats: int = 3, quick: bool = False) -> Profile:
    import torch
    from PIL import Image

    from serving.config import EngineConfig
    from serving.engine.llm import LLMEngine
    from serving.types import SamplingParams

    torch.set_num_threads(threads)
    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", dtype="float32", max_num_seqs=64))
    proc = engine.inputs.image_processor
    samples: dict[str, list[list[float]]] = {"encode": [], "prefill": [], "decode": [], "transfer": []}
    rng = np.random.default_rng(0)

    for w, h in IMAGE_SIZES[:2] if quick else IMAGE_SIZES:
        image = proc(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        tokens = engine.model_config.num_image_tokens(image.grid_thw)
        samples["encode"].append([tokens, _median_time(lambda im=image: engine.runner.encode([im]), repeats)])

    vocab = engine.tokenizer.vocab_size - 64

    def prompt(n: int):  # noqa: ANN202 - an engine Prompt
        from serving.engine.inputs import Prompt

        return Prompt([int(t) for t in rng.integers(10, vocab, n)])

    def run_prefill(n: int) -> None:
        engine.add_request(prompt(n), SamplingParams(max_tokens=1, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()

    for n in PREFILL_TOKENS[:3] if quick else PREFILL_TOKENS:
        samples["prefill"].append([n, _median_time(lambda n=n: run_prefill(n), repeats)])

    for b in DECODE_BATCHES[:4] if quick else DECODE_BATCHES:
        ids = [
            engine.add_request(prompt(96), SamplingParams(max_tokens=48, ignore_eos=True)) for _ in range(b)
        ]
        started: set[str] = set()
        while len(started) < b:
            started.update(d.request_id for d in engine.step() if d.token_ids)
        for _ in range(2):
            engine.step()
        steps = 6 if quick else 12
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        samples["decode"].append([b, (time.perf_counter() - start) / steps])
        for i in ids:
            engine.abort(i)

    samples["transfer"] = _transfers(repeats)
    e_base, e_tok = fit([(a, b) for a, b in samples["encode"]])
    p_base, p_tok = fit([(a, b) for a, b in samples["prefill"]])
    d_base, d_seq = fit([(a - 1, b) for a, b in samples["decode"]])
    t_base, t_byte = (
        fit([(a, b) for a, b in samples["transfer"]]) if samples["transfer"] else (0.002, 2.5e-10)
    )
    mc = engine.model_config
    embed_bytes = 256 * mc.text.hidden_size * 4  # one large image's embeddings, float32
    kv_bytes = 300 * mc.kv_bytes_per_token(4)  # a typical prompt's KV
    costs = StageCosts(
        encode_base_s=e_base,
        encode_per_token_s=e_tok,
        prefill_base_s=p_base,
        prefill_per_token_s=p_tok,
        decode_base_s=d_base,
        decode_per_seq_s=d_seq,
        e2p_s=t_base + t_byte * embed_bytes,
        p2d_s=t_base + t_byte * kv_bytes,
        max_decode_batch=engine.cfg.max_num_seqs,
    )
    vc = engine.inputs.image_processor.cfg
    words = "describe the picture and count the objects in the scene".split()
    counts = [
        (n, len(engine.tokenizer.encode_chat([{"role": "user", "content": " ".join(words * n)}])))
        for n in (1, 8)
    ]
    per_word = (counts[1][1] - counts[0][1]) / (len(words) * 7)
    overhead = counts[0][1] - per_word * len(words)
    tokens = Tokens(per_word, round(overhead), vc.patch_size, vc.merge_size, vc.min_pixels, vc.max_pixels)
    machine = f"{platform.processor() or platform.machine()}, {threads} thread(s), torch {torch.__version__}"
    return Profile(costs, tokens, str(model_dir), machine, threads, samples)


def _transfers(repeats: int) -> list[list[float]]:
    """NIXL pulls between two agents of this process (the first of each size is a warm-up)."""
    import torch

    agents: list = []  # the transports made so far, closed whatever happens
    try:
        from serving.transport import make_transport

        owner = make_transport("nixl", "profile-owner")
        agents.append(owner)
        reader = make_transport("nixl", "profile-reader")
        agents.append(reader)
        src = torch.ones(max(TRANSFER_BYTES), dtype=torch.uint8)
        dst = torch.zeros_like(src)
        owner.register("buf", src)
        reader.register("buf", dst)
        owner.add_peer(reader.metadata())
        reader.add_peer(owner.metadata())
        out = []
        for n in TRANSFER_BYTES:

            def pull(n: int = n) -> None:
                ref = owner.publish("buf", [(0, n)])
                t = reader.read(ref, "buf", [(0, n)], b"profile")
                while not t.poll().final:
                    pass

            out.append([n, _median_time(pull, repeats + 2)])
        return out
    except Exception:  # noqa: BLE001 - NIXL missing or refused: the profile uses FACTS.md's rates
        return []
    finally:
        # Closed on every path: a transfer that raised used to leave both agents (and their progress
        # threads) running for the rest of the process.
        for agent in reversed(agents):
            with contextlib.suppress(Exception):
                agent.close()
