"""Training examples from shapes-world items, laid out exactly as the serving path lays out a request.

The prompt goes through the same `InputProcessor` the engine uses (chat template, pad expansion, image
and video preprocessing) and its M-RoPE positions come from the same function, so what the model
learns to read is what it is served. The assistant's reply is the answer followed by `<|im_end|>`;
only those tokens carry loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from serving.engine.image_processor import ProcessedImage
from serving.engine.inputs import InputProcessor
from serving.engine.mrope import mrope_positions
from serving.evals import clips
from serving.evals.tasks import TASKS, Scene, draw
from serving.training.dense import HEADS, scene_slots, token_targets
from serving.training.focus import (
    ATTENTIONS,
    FocusRows,
    anchor_word,
    colour_word_at,
    focus_rows,
    named_colour,
)
from serving.training.recipe import Recipe

IGNORE = -100


@dataclass
class Example:
    token_ids: list[int]  # prompt + answer + <|im_end|>
    labels: list[int]  # IGNORE on the prompt
    positions: torch.Tensor  # (3, len(token_ids))
    media: list[ProcessedImage]
    is_video: list[bool]
    targets: dict[str, torch.Tensor]  # per probe head, (visual tokens, classes): what each token covers
    scene: torch.Tensor  # (len(SLOTS),): the scene every token should know
    focus: int = 0  # focus.named_colour: the colour class the question names, EVERY, or 0 for none
    prompt_len: int = 0
    colour_at: int = -1  # the position of the question's colour word (focus.anchor_word), -1 for none


def example(
    inputs: InputProcessor, task: str, prompt: str, answer: str, media: object, scene: Scene
) -> Example:
    """`media` is a PIL image or a list of frames (a video)."""
    built = inputs.from_user_prompt(prompt, [media])  # type: ignore[list-item]
    cfg = inputs.model_config
    reply = inputs.tokenizer.encode_text(answer) + [inputs.tokenizer.token_id("<|im_end|>")]
    ids = built.token_ids + reply
    positions, delta = mrope_positions(
        built.token_ids, built.grids, cfg.image_token_id, cfg.vision.spatial_merge_size, cfg.video_token_id
    )
    n = len(built.token_ids)
    tail = (torch.arange(n, len(ids)) + delta).expand(3, -1)
    labels = [IGNORE] * n + reply
    frames = media if isinstance(media, list) else [media]
    c = inputs.image_processor.cfg
    targets = token_targets(frames, scene, built.images[0].grid_thw, c.merge_size)  # type: ignore[arg-type]
    focus = named_colour(task, prompt)
    colour_at = -1
    if focus:
        colour_at = colour_word_at(built.token_ids, inputs.tokenizer.encode_text(anchor_word(focus)), n)
    return Example(
        ids,
        labels,
        torch.cat([positions, tail], dim=1),
        built.images,
        [isinstance(media, list)],
        targets,
        scene_slots(scene),
        focus,
        n,
        colour_at,
    )


def draw_example(inputs: InputProcessor, seed: int, task: str, index: int) -> Example:
    d = draw(seed, task, index)
    media: object = clips.decode_frames(d.video) if d.video is not None else d.image
    return example(inputs, task, d.prompt, d.answer, media, d.scene)


def task_schedule(weights: dict[str, float], data_seed: int, step: int, batch_size: int) -> list[str]:
    """The tasks of one step's examples: a pure function of the step, so a resumed run sees the same
    data as an uninterrupted one."""
    names = [t for t in TASKS if weights.get(t, 0) > 0]
    p = np.array([weights[t] for t in names], dtype=np.float64)
    rng = np.random.default_rng([data_seed, 1_000_003, step])
    return [names[int(i)] for i in rng.choice(len(names), size=batch_size, p=p / p.sum())]


def step_batch(inputs: InputProcessor, recipe: Recipe, step: int) -> dict[str, torch.Tensor]:
    """One training step's batch: a pure function of the recipe and the step."""
    size, first = recipe.batch_at(step)
    tasks = task_schedule(recipe.weights_at(step), recipe.data_seed, step, size)
    examples = [draw_example(inputs, recipe.data_seed, task, first + j) for j, task in enumerate(tasks)]
    cfg = inputs.model_config
    return collate(
        examples, inputs.tokenizer.token_id("<|endoftext|>"), cfg.image_token_id, cfg.video_token_id
    )


def pop_probe_targets(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The probes' targets, taken out of a batch so the rest is the model's keyword arguments."""
    return {name: batch.pop(f"visual_{name}") for name in HEADS}, batch.pop("scene_targets")


FOCUS_KEYS = tuple(f"{name}_{part}" for name in ATTENTIONS for part in ("query", "target"))


def pop_focus(batch: dict[str, torch.Tensor]) -> FocusRows:
    """The supervised attentions' rows and targets (serving/training/focus.py), taken out of a batch."""
    return FocusRows(**{key: batch.pop(key) for key in FOCUS_KEYS})


def collate(examples: list[Example], pad_id: int, image_id: int, video_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch in the keyword arguments of `transformers`' Qwen2-VL forward."""
    width = max(len(e.token_ids) for e in examples)
    batch = len(examples)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    positions = torch.zeros((3, batch, width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.token_ids)
        ids[i, :n] = torch.tensor(e.token_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        positions[:, i, :n] = e.positions
    media = [m for e in examples for m in e.media]
    is_video = [v for e in examples for v in e.is_video]
    out = dict(input_ids=ids, labels=labels, attention_mask=mask, position_ids=positions)
    # The model encodes a batch's images first, then its videos: the probe's targets in that order.
    ordered = [e for e in examples if not e.is_video[0]] + [e for e in examples if e.is_video[0]]
    for name in HEADS:
        out[f"visual_{name}"] = torch.cat([e.targets[name] for e in ordered])
    out["scene_targets"] = torch.cat([e.scene.expand(len(e.targets["colour"]), -1) for e in ordered])
    rows = focus_rows(
        [e.targets["colour"] for e in examples],
        [e.targets["centre"] for e in examples],
        [0 if e.is_video[0] else e.focus for e in examples],
        [e.colour_at for e in examples],
        [e.prompt_len for e in examples],
        [(ids[i] == image_id).nonzero().squeeze(1) for i in range(batch)],
        width,
        [e.targets["place"] for e in examples],
    )
    out |= {key: getattr(rows, key) for key in FOCUS_KEYS}
    return out | hf_media_kwargs(ids, media, is_video, image_id, video_id)


def hf_media_kwargs(
    ids: torch.Tensor, media: list[ProcessedImage], is_video: list[bool], image_id: int, video_id: int
) -> dict[str, torch.Tensor]:
    """`transformers`' Qwen2-VL media arguments for token ids and their media in prompt order: images
    and videos each packed in order, and the token types it needs beside grids (1 image, 2 video)."""
    out = {"mm_token_type_ids": (ids == image_id).int() + 2 * (ids == video_id).int()}
    images = [m for m, v in zip(media, is_video, strict=True) if not v]
    videos = [m for m, v in zip(media, is_video, strict=True) if v]
    if images:
        out["pixel_values"] = torch.cat([m.pixel_values for m in images])
        out["image_grid_thw"] = torch.tensor([m.grid_thw for m in images])
    if videos:
        out["pixel_values_videos"] = torch.cat([m.pixel_values for m in videos])
        out["video_grid_thw"] = torch.tensor([m.grid_thw for m in videos])
    return out
