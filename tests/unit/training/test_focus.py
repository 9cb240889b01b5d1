"""The supervised attentions: the look's targets put the question's colour word on the shapes of that
colour, the relay's put the answering position on the colour word, the read's put each digit's
predicting position on that digit's ink; the attention is the model's own
(checked against `transformers`' eager attention weights), and trained on, each moves its head."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from serving.engine.inputs import InputProcessor
from serving.engine.models.builder import build_model
from serving.evals.tasks import draw
from serving.training.batches import IGNORE, collate, draw_example, pop_focus, pop_probe_targets
from serving.training.focus import ATTENTIONS, COLOUR_CLASS, EVERY, AttentionFocus, named_colour
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
    # Counting every shape starts from "shapes"; a question naming only a kind has nothing to focus on.
    assert named_colour("count", "How many shapes are there?") == EVERY
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
    return batch, labels, pop_focus(batch)


def test_targets_lie_on_the_named_colour_and_sum_to_one(tiny):
    _, inputs, pad = tiny
    batch, labels, rows = _batch(inputs, pad, "side")
    ids = batch["input_ids"]
    image = ids == inputs.model_config.image_token_id
    assert (rows.look_query >= 0).all()  # side always shows the named colour
    for i in range(len(ids)):
        word = int(rows.look_query[i])
        named = inputs.tokenizer.decode(ids[i, word : word + 1].tolist()).strip()
        assert COLOUR_CLASS[named] > 0  # the look starts at the question's colour word
        assert rows.look_target[i].sum().item() == pytest.approx(1.0)
        on = rows.look_target[i] > 0
        assert on.any() and image[i][on].all()  # only image tokens
        assert on.sum() < image[i].sum() / 2  # the named shape, not the whole image
        answer = int((labels[i] != IGNORE).nonzero()[0])
        assert rows.relay_query[i] == answer - 1  # the last prompt token: its logits give the answer's first
        assert rows.relay_target[i].nonzero().flatten().tolist() == [word]
    # count_colour may ask for a colour that is not there: nothing to look at, the word still read.
    n = 12
    examples = [draw_example(inputs, 5, "count_colour", i) for i in range(n)]
    answers = [int(draw(5, "count_colour", i).answer) for i in range(n)]
    _, _, rows = _batch(inputs, pad, "count_colour", n)
    assert ((rows.look_query < 0) == (rows.look_target.sum(1) == 0)).all()
    assert (rows.look_query < 0).any() and (rows.look_query >= 0).any()
    assert (rows.relay_query >= 0).all()
    # The count: equal parts on each shape of the colour and on the word itself, for every count.
    assert rows.count_query.tolist() == [e.colour_at for e in examples]
    for i, (e, count) in enumerate(zip(examples, answers, strict=True)):
        on = rows.count_target[i] > 0
        centres = int((e.targets["centre"][:, e.focus] > 0).sum())
        assert centres <= count and int(on.sum()) == centres + 1 and bool(on[rows.count_query[i]])
        assert rows.count_target[i][on].tolist() == pytest.approx([1 / (centres + 1)] * (centres + 1))
    assert 0 in answers and max(answers) >= 2
    # Counting every shape: no look, the count over every shape's token from the word "shapes".
    examples = [draw_example(inputs, 5, "count", i) for i in range(6)]
    _, _, rows = _batch(inputs, pad, "count")
    assert (rows.look_query < 0).all() and (rows.relay_query >= 0).all()
    for i, e in enumerate(examples):
        word = int(rows.count_query[i])
        n = len(inputs.tokenizer.encode_text(" shapes"))  # the word's last token: it has read the word
        assert (
            word == e.colour_at and inputs.tokenizer.decode(e.token_ids[word - n + 1 : word + 1]) == " shapes"
        )
        # One token per shape, where its centre falls (two centres in one token count once).
        centres = int((e.targets["centre"][:, 1:].sum(1) > 0).sum())
        assert 1 <= centres <= int(draw(5, "count", i).answer)
        assert int((rows.count_target[i] > 0).sum()) == centres + 1
    # Tasks whose question names no colour have none.
    _, _, rows = _batch(inputs, pad, "colour")
    assert (rows.look_query < 0).all() and (rows.relay_query < 0).all() and (rows.count_query < 0).all()


def test_reading_looks_from_each_digits_predicting_position_onto_that_digits_ink(tiny):
    _, inputs, pad = tiny
    examples = [draw_example(inputs, 5, "read", i) for i in range(8)]
    batch, labels, rows = _batch(inputs, pad, "read", n=8)
    assert rows.read_query.shape == (8, 3) and rows.read_target.shape[:2] == (8, 3)
    for i, e in enumerate(examples):
        answer = draw(5, "read", i).answer
        digits = len(answer)
        # The k-th digit is predicted at the position before it: the last prompt token, then each digit.
        assert rows.read_query[i, :digits].tolist() == [e.prompt_len - 1 + k for k in range(digits)]
        assert (rows.read_query[i, digits:] == -1).all() and (rows.read_target[i, digits:] == 0).all()
        targets = labels[i, rows.read_query[i, :digits] + 1].tolist()
        assert inputs.tokenizer.decode(targets) == answer
        image = (batch["input_ids"][i] == inputs.model_config.image_token_id).nonzero().squeeze(1)
        for k in range(digits):
            t = rows.read_target[i, k]
            assert t.sum().item() == pytest.approx(1.0)
            on = t.nonzero().squeeze(1)
            assert set(on.tolist()) <= set(image.tolist())
            # Exactly the tokens that digit inked (the place target), weighted by its ink in each.
            place = e.targets["place"][:, k + 1]
            assert torch.allclose(t[image], place / place.sum())
    # Nothing to read elsewhere.
    for task in ("side", "count", "colour"):
        assert (_batch(inputs, pad, task)[2].read_query < 0).all()


def test_the_head_attention_is_the_models_own(tiny):
    out, inputs, pad = tiny
    model = _hf_model(out, 0)
    model.eval()
    focus = AttentionFocus(model, layer=1)
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    for task, names in (("side", ("look", "count", "relay")), ("read", ("read",))):
        batch, _, rows = _batch(inputs, pad, task)
        with torch.no_grad():
            attentions = model(**batch, output_attentions=True).attentions[1]  # (B, H, T, T)
        for query, target in map(rows.pair, names):
            # One row per query; `read` has one per digit, and none past a short number's last.
            example = torch.arange(len(query)).repeat_interleave(query[0].numel())
            flat, rows_target = query.reshape(-1), target.reshape(len(example), -1)
            on = flat >= 0
            assert on.sum() >= len(query)
            for h in range(model.config.text_config.num_attention_heads):
                loss, mass = focus.loss(query, target, head=h)
                weights = attentions[example[on], h, flat[on]]  # (R, T): attention at each query row
                t = rows_target[on]
                expected_loss = -(t * weights.clamp_min(1e-30).log()).sum(1).mean()
                expected_mass = (weights * (t > 0)).sum(1).mean()
                assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-4)
                assert mass == pytest.approx(expected_mass.item(), rel=1e-4)
        focus.close_pass()


def test_training_on_them_moves_the_heads_attention(tmp_path, one_thread):
    recipe = replace(
        RECIPE,
        look_weight=1.0,
        count_weight=1.0,
        relay_weight=1.0,
        read_weight=1.0,
        read_layer=1,  # the test preset has two layers
        steps=30,
        task_weights={"side": 1.0, "count_colour": 1.0, "read": 1.0},
    )
    trainer = Trainer(tmp_path / "m", recipe, log=lambda _: None)

    def masses() -> list[float]:
        got = [sum(m) / len(m) for m in trainer.focus_mass.values()]
        for m in trainer.focus_mass.values():
            m.clear()
        return got

    first = [trainer.train_step() for _ in range(3)]
    before = masses()
    for _ in range(recipe.steps - 6):
        trainer.train_step()
    masses()
    last = [trainer.train_step() for _ in range(3)]
    after = masses()
    assert len(after) == len(ATTENTIONS)
    assert all(a > 1.5 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert sum(last) < sum(first)
