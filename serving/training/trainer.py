"""The training loop: `transformers`' Qwen2-VL on CPU torch, resumable, deterministic for its seed.

Lifecycle of `train(out, recipe)`:
  1. lay out the model directory (config, tokenizer, chat template, processors) from the preset;
  2. build the model with its own initialisation under `recipe.seed`, or resume from `checkpoint.pt`;
  3. each step draws its examples as a pure function of the step (`task_schedule`, item indices), so a
     resumed run sees the same data an uninterrupted one would;
  4. every `checkpoint_every` steps: the checkpoint (model, optimiser, step, elapsed, log), written
     atomically, and a teacher-forced exact-match check on a fixed held-out sample per task;
  5. at the end: the weights in bfloat16 as `model.safetensors`, and `training.json` beside them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from serving.engine.inputs import InputProcessor
from serving.engine.models.builder import build_model
from serving.evals.tasks import TASKS
from serving.training.batches import IGNORE, collate, draw_example, pop_focus, pop_probe_targets, step_batch
from serving.training.dense import MergerProbe
from serving.training.focus import ATTENTIONS, AttentionFocus
from serving.training.prefetch import Prefetcher
from serving.training.recipe import Recipe

CHECK_SEED = 99_991  # the in-training check's items: a seed never drawn for training
CHECK_ITEMS = 8


def lr_at(recipe: Recipe, step: int) -> float:
    """Per stage (the tower alone, the whole model, the readout): linear warm-up, then cosine decay
    to `min_lr_ratio` of the stage's peak. Each stage warms up again: its optimiser starts afresh or
    its decoder starts from nothing."""
    start, end = recipe.stage_span(step)
    peak = recipe.readout_lr if recipe.stage_at(step) == "readout" else recipe.lr
    step -= start
    if step < recipe.warmup:
        return peak * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, end - start - recipe.warmup)
    floor = recipe.min_lr_ratio
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def readout_note(sha256: str) -> str:
    return f"the readout stage, started from an exported model (--init; weights sha256 {sha256[:12]})"


def _hf_model(model_dir: Path, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration._from_config(
        config, attn_implementation="sdpa", dtype=torch.float32
    )


def _float_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def exported_model(model_dir: Path) -> torch.nn.Module:
    """An exported model directory as `transformers`' Qwen2-VL in float32, in eval mode: for tools that
    look inside the trained model (benchmarks/side_readout.py)."""
    model = _hf_model(model_dir, 0)
    model.load_state_dict(_float_weights(model_dir / "model.safetensors"))
    return model.eval()


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    def __init__(
        self, out: Path, recipe: Recipe, log: Callable[[str], None] = print, init: Path | None = None
    ) -> None:
        self.out = out
        self.recipe = recipe
        self.log = log
        self.init = init
        self.init_record: dict[str, Any] | None = None
        if not (out / "config.json").exists():
            build_model(out, recipe.preset)
            (out / "model.safetensors").unlink()  # the builder's random weights; training makes its own
        self.inputs = InputProcessor.from_dir(str(out))
        self.model = _hf_model(out, recipe.seed)
        self.probe = MergerProbe(self.model, self.inputs.model_config.text.hidden_size)
        # The supervised attentions that are on: (name, its head's capture, weight).
        self.foci: list[tuple[str, AttentionFocus, float]] = []
        for name in ATTENTIONS:
            weight, layer, head = recipe.attention(name)
            if weight:
                self.foci.append((name, AttentionFocus(self.model, layer, head), weight))
        # Each supervised head's attention on its target in training batches, between two checks.
        self.focus_mass: dict[str, list[float]] = {name: [] for name in ATTENTIONS}
        self.optim = self._optimiser([*self.model.parameters(), *self.probe.parameters()])
        self.prefetcher: Prefetcher | None = None
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict[str, Any]] = []
        cfg = self.inputs.model_config
        self.pad_args = (
            self.inputs.tokenizer.token_id("<|endoftext|>"),
            cfg.image_token_id,
            cfg.video_token_id,
        )
        self._check = [
            (t, draw_example(self.inputs, CHECK_SEED, t, i)) for t in TASKS for i in range(CHECK_ITEMS)
        ]

    def _optimiser(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        r = self.recipe
        return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay, betas=(0.9, 0.98))

    def begin_readout(self, round_weights: bool = True) -> None:
        """The readout stage's start: weights rounded to bfloat16 as an export rounds them (so a run
        and a start from its exported model go on from the same numbers), the tower frozen but for
        its merger, and a fresh optimiser over what still learns."""
        if round_weights:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
        visual = self.model.model.visual
        merger = {id(p) for p in visual.merger.parameters()}
        for p in visual.parameters():
            p.requires_grad_(id(p) in merger)
        # The last step's gradients would stay on the frozen tower and count in every later clip.
        self.model.zero_grad(set_to_none=True)
        self.optim = self._optimiser([p for p in self.model.parameters() if p.requires_grad])

    def start_from(self, model_dir: Path) -> None:
        """Begin at the readout stage from a trained model directory (its `model.safetensors` and
        `training.json`): its record becomes this run's history up to the stage, whose first step
        then begins it as in an uninterrupted run."""
        record = json.loads((model_dir / "training.json").read_text())
        if record["steps"] != self.recipe.readout_from:
            raise SystemExit(
                f"{model_dir} was trained for {record['steps']} steps; the readout stage starts at "
                f"{self.recipe.readout_from}"
            )
        weights = model_dir / "model.safetensors"
        self.model.load_state_dict(_float_weights(weights))
        self.step, self.history = record["steps"], record["history"]
        self.elapsed = record["wall_minutes"] * 60
        self.init_record = {
            "from": record["recipe"],
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        }
        self.history.append({"step": self.step, "note": readout_note(self.init_record["sha256"])})
        self.log(f"readout from {model_dir} at step {self.step} ({self.elapsed / 60:.1f} min trained)")

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def resume(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, weights_only=False)
        if state["recipe"] != self.recipe.to_json():
            raise SystemExit(f"{self.checkpoint_path} was written by another recipe; remove it to start over")
        self.model.load_state_dict(state["model"])
        self.probe.load_state_dict(state["probe"])
        self.step, self.elapsed, self.history = state["step"], state["elapsed"], state["history"]
        self.init_record = state.get("init")
        if self.recipe.stage_at(self.step) == "readout" and self.step > self.recipe.readout_from:
            # The optimiser's state below is over the readout's parameters; the weights are the
            # checkpoint's as they are.
            self.begin_readout(round_weights=False)
        self.optim.load_state_dict(state["optim"])
        self.log(f"resumed at step {self.step} ({self.elapsed / 60:.1f} min trained)")
        return True

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        if self.prefetcher is not None:
            return self.prefetcher.get(step)
        return step_batch(self.inputs, self.recipe, step)

    def train_step(self) -> float:
        r = self.recipe
        if self.step == r.readout_from:
            self.begin_readout()
        for group in self.optim.param_groups:
            group["lr"] = lr_at(r, self.step)
        self.model.train()
        batch = self.batch(self.step)
        targets, scene = pop_probe_targets(batch)
        rows = pop_focus(batch)
        self.probe.outputs.clear()
        stage = r.stage_at(self.step)
        if stage == "tower":
            self._encode_media(batch)
            loss = self.probe.loss(targets, scene, r.tower_scene_weight)
        else:
            loss = self.model(**batch).loss
            if r.probe_weight and stage == "whole":
                loss = loss + r.probe_weight * self.probe.loss(targets, scene, r.scene_weight)
            for name, focus, weight in self.foci:
                focus_loss, mass = focus.loss(*rows.pair(name))
                focus.close_pass()
                loss = loss + weight * focus_loss
                if not math.isnan(mass):
                    self.focus_mass[name].append(mass)
        self.probe.outputs.clear()
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
        self.optim.step()
        self.step += 1
        return loss.item()

    def _encode_media(self, batch: dict[str, torch.Tensor]) -> None:
        """The vision tower alone over a batch's images, then its videos: the order the model encodes
        them in, so the probe's hook sees the outputs its targets are laid out for."""
        visual = self.model.model.visual
        if "pixel_values" in batch:
            visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        if "pixel_values_videos" in batch:
            visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"])

    @torch.no_grad()
    def check(self) -> tuple[dict[str, float], dict[str, float]]:
        """Teacher-forced exact match per task: every answer token (and the end) is the argmax. When
        all are, greedy decoding emits exactly the answer, so this equals greedy accuracy. Beside it,
        the probes' accuracy per head over the same items' tokens (what the tower sees)."""
        self.model.eval()
        hits: dict[str, list[bool]] = {}
        seen: dict[str, list[float]] = {}
        for start in range(0, len(self._check), 16):
            chunk = self._check[start : start + 16]
            batch = collate([e for _, e in chunk], *self.pad_args)
            labels = batch.pop("labels")
            targets, _ = pop_probe_targets(batch)
            pop_focus(batch)
            logits = self.model(**batch).logits
            for _, focus, _ in self.foci:
                focus.close_pass()
            for head, accuracy in self.probe.accuracy(targets).items():
                seen.setdefault(head, []).append(accuracy)
            predicted = logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            ok = ((predicted == target) | (target == IGNORE)).all(dim=1)
            for (task, _), good in zip(chunk, ok.tolist(), strict=True):
                hits.setdefault(task, []).append(good)
        return {t: sum(v) / len(v) for t, v in hits.items()}, {h: sum(v) / len(v) for h, v in seen.items()}

    def save_checkpoint(self) -> None:
        _save_atomic(
            {
                "recipe": self.recipe.to_json(),
                "model": self.model.state_dict(),
                "probe": self.probe.state_dict(),
                "optim": self.optim.state_dict(),
                "step": self.step,
                "elapsed": self.elapsed,
                "history": self.history,
                "init": self.init_record,
            },
            self.checkpoint_path,
        )

    def run(self, max_minutes: float | None = None) -> None:
        r = self.recipe
        torch.set_num_threads(r.threads)
        if not self.resume() and self.init is not None:
            self.start_from(self.init)
        deadline = time.monotonic() + max_minutes * 60 if max_minutes else math.inf
        losses: list[float] = []
        if r.prefetch and self.step < r.steps:
            self.prefetcher = Prefetcher(str(self.out), r)
        try:
            self._loop(deadline, losses)
        finally:
            if self.prefetcher is not None:
                self.prefetcher.close()
                self.prefetcher = None
        if self.step >= r.steps:
            self.export()

    def _loop(self, deadline: float, losses: list[float]) -> None:
        r = self.recipe
        while self.step < r.steps and time.monotonic() < deadline:
            t0 = time.perf_counter()
            losses.append(self.train_step())
            self.elapsed += time.perf_counter() - t0
            if self.step % r.checkpoint_every == 0 or self.step == r.steps:
                accuracy, probes = self.check()
                mean_loss = sum(losses) / len(losses)
                entry: dict[str, Any] = {
                    "step": self.step,
                    "minutes": round(self.elapsed / 60, 2),
                    "loss": round(mean_loss, 4),
                    "check": {t: round(a, 3) for t, a in accuracy.items()},
                }
                if r.stage_at(self.step - 1) != "readout":  # the probes stop learning there
                    entry["probes"] = {h: round(a, 3) for h, a in probes.items()}
                for name, masses in self.focus_mass.items():  # each supervised head, training batches
                    if masses:
                        entry[f"{name}_mass"] = round(sum(masses) / len(masses), 3)
                        masses.clear()
                self.history.append(entry)
                self.log(json.dumps(self.history[-1]))
                losses.clear()
                self.save_checkpoint()

    def export(self) -> None:
        """bfloat16 weights under `transformers`' names, and the record of how they were made."""
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(self.out / "model.safetensors"), metadata={"format": "pt"})
        (self.out / "model.safetensors").chmod(0o644)  # a model directory is meant to be shared
        record = {
            "recipe": self.recipe.to_json(),
            "steps": self.step,
            "wall_minutes": round(self.elapsed / 60, 1),
            "torch": torch.__version__,
            "history": self.history,
        }
        if self.init_record is not None:
            record["init"] = self.init_record  # the stages before the readout were another run's
        (self.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        self.checkpoint_path.unlink(missing_ok=True)


def train(
    out: str | Path, recipe: Recipe, max_minutes: float | None = None, init: str | Path | None = None
) -> Path:
    out = Path(out)
    trainer = Trainer(out, recipe, init=Path(init) if init is not None else None)
    trainer.run(max_minutes)
    return out
