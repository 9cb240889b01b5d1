"""The attention-focus loss: its targets name the question's colour where the shapes of that colour lie,
its attention is the model's own (checked against `transformers`' eager attention weights), and
trained on, it moves that attention."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from serving.engine.inputs import InputProcessor
from serving.engine.models.builder import build_model
from serving.training.batches import IGNORE, collate, draw_example, pop_focus, pop_probe_targets
from serving.training.focus import COLOUR_CLASS, AttentionFocus, named_colour
from serving.training.recipe import Recipe
from serving.training.trainer import Trainer, _hf_model

RECIPE = Recipe(
    preset="shapes-tiny",
    steps=40,
    tower_steps=0,
    batch_size=8,
    warmup=5,
    checkpoint_every=1000,
    threads=1,
    prefetch=False,
)


def test_the_named_colour_is_read_from_the_question():
    assert named_colour("side", "Is the blue circle on the left or the right?") == COLOUR_CLASS["blue"]
    assert named_colour("count_colour", "How many yellow shapes are there?") == COLOUR_CLASS["yellow"]
    assert named_colour("shape", "What shape is the red object?") == COLOUR_CLASS["red"]
    # Tasks that ask about every shape, or name a kind of shape, have nothing to focus on.
    assert named_colour("count", "How many shapes are there?") == 0
    assert named_colour("colour", "What colour is the square?") == 0
    assert named_colour("motion", "Which way does the red circle move?") == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("focus") / "m"
    build_model(out, "shapes-tiny")
    inputs = InputProcessor.from_dir(str(out))
    cfg = inputs.model_config
    pad = (inputs.tokenizer.token_id("<|endoftext|>"), cfg.image_token_id, cfg.video_token_id)
    return out, inputs, pad


def _batch(inputs, pad, task, n=6):
    batch = collate([draw_example(inputs, 5, task, i) for i in range(n)], *pad)
    labels = batch.pop("labels")
    pop_probe_targets(batch)
    return batch, labels, *pop_focus(batch)


def test_targets_lie_on_the_named_colour_and_sum_to_one(tiny):
    _, inputs, pad = tiny
    batch, labels, query, target = _batch(inputs, pad, "side")
    image = batch["input_ids"] == inputs.model_config.image_token_id
    assert (query >= 0).all()  # side always shows the named colour
    for i in range(len(query)):
        answer = int((labels[i] != IGNORE).nonzero()[0])
        assert query[i] == answer - 1  # the last prompt token: its logits give the answer's first
        assert target[i].sum().item() == pytest.approx(1.0)
        on = target[i] > 0
        assert on.any() and image[i][on].all()  # only image tokens
        assert on.sum() < image[i].sum() / 2  # the named shape, not the whole image
    # count_colour may ask for a colour that is not there: no target, no query.
    _, _, query, target = _batch(inputs, pad, "count_colour", 12)
    assert ((query < 0) == (target.sum(1) == 0)).all()
    assert (query < 0).any() and (query >= 0).any()


def test_the_head_attention_is_the_models_own(tiny):
    out, inputs, pad = tiny
    model = _hf_model(out, 0)
    model.eval()
    batch, _, query, target = _batch(inputs, pad, "side")
    focus = AttentionFocus(model, layer=1)
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions[1]  # (B, H, T, T)
    for h in range(model.config.text_config.num_attention_heads):
        loss, mass = focus.loss(query, target, head=h)
        rows = torch.arange(len(query))
        weights = attentions[rows, h, query]  # (B, T): the head's attention at each query row
        expected_loss = -(target * weights.clamp_min(1e-30).log()).sum(1).mean()
        expected_mass = (weights * (target > 0)).sum(1).mean()
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-4)
        assert mass == pytest.approx(expected_mass.item(), rel=1e-4)


def test_training_on_it_moves_the_heads_attention(tmp_path, one_thread):
    recipe = replace(RECIPE, focus_weight=1.0, focus_layer=1, steps=30, task_weights={"side": 1.0})
    trainer = Trainer(tmp_path / "m", recipe, log=lambda _: None)
    first = [trainer.train_step() for _ in range(3)]
    mass_first = sum(trainer.focus_mass) / len(trainer.focus_mass)
    trainer.focus_mass.clear()
    for _ in range(recipe.steps - 6):
        trainer.train_step()
    trainer.focus_mass.clear()
    last = [trainer.train_step() for _ in range(3)]
    mass_last = sum(trainer.focus_mass) / len(trainer.focus_mass)
    assert mass_last > 2 * mass_first, (mass_first, mass_last)
    assert sum(last) < sum(first)
