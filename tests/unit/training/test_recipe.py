"""The training recipe at test size: the loss falls over a few dozen steps, a resumed run equals an
uninterrupted one bit for bit, and the export loads through the serving loader unchanged."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from serving.config import EngineConfig
from serving.engine.llm import LLMEngine
from serving.evals.tasks import TASKS
from serving.training.batches import IGNORE, task_schedule
from serving.training.recipe import Recipe
from serving.training.trainer import Trainer, lr_at

RECIPE = Recipe(
    preset="shapes-tiny",
    steps=40,
    tower_steps=0,
    batch_size=8,
    lr=3e-3,
    warmup=5,
    checkpoint_every=1000,
    threads=1,
    prefetch=False,
)


def test_loss_falls(tmp_path, one_thread):
    trainer = Trainer(tmp_path / "m", RECIPE, log=lambda _: None)
    losses = [trainer.train_step() for _ in range(RECIPE.steps)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # The answers' loss and the probes' together: each probe head's few covered tokens weigh as much
    # as the rest, so the probes' part starts high and falls slower than the answers'.
    assert last < 0.8 * first, (first, last)


def test_resumed_run_equals_uninterrupted(tmp_path):
    recipe = replace(RECIPE, steps=6, checkpoint_every=3)
    whole = Trainer(tmp_path / "whole", recipe, log=lambda _: None)
    whole.run()
    # An interrupted run: three steps and the checkpoint written at the third.
    partial = Trainer(tmp_path / "split", recipe, log=lambda _: None)
    while partial.step < 3:
        partial.train_step()
    partial.save_checkpoint()
    resumed = Trainer(tmp_path / "split", recipe, log=lambda _: None)
    resumed.run()
    assert resumed.step == 6
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    b = (tmp_path / "split" / "model.safetensors").read_bytes()
    assert a == b
    assert not resumed.checkpoint_path.exists()  # removed once the export is written


def test_export_serves_through_the_engine(tmp_path):
    recipe = replace(RECIPE, steps=2)
    Trainer(tmp_path / "m", recipe, log=lambda _: None).run()
    engine = LLMEngine(EngineConfig(model=str(tmp_path / "m"), num_kv_blocks=64, block_size=8))
    from serving.evals.tasks import item
    from serving.types import SamplingParams

    it = item(1, "motion", 0)
    prompt = engine.inputs.from_user_prompt(it.prompt, [it.frames()])
    assert engine.model_config.video_token_id in prompt.token_ids
    result = engine.generate([(prompt, SamplingParams(max_tokens=3))])[0]
    assert len(result.token_ids) >= 1
    assert (tmp_path / "m" / "training.json").exists()


def test_schedule_is_a_function_of_the_step_and_weights():
    weights = {t: 1.0 for t in TASKS}
    assert task_schedule(weights, 7, 12, 16) == task_schedule(weights, 7, 12, 16)
    assert task_schedule(weights, 7, 12, 16) != task_schedule(weights, 7, 13, 16)
    only = task_schedule({**{t: 0.0 for t in TASKS}, "read": 1.0}, 7, 0, 8)
    assert only == ["read"] * 8


def test_only_the_answer_carries_loss(tmp_path):
    trainer = Trainer(tmp_path / "m", replace(RECIPE, batch_size=4), log=lambda _: None)
    batch = trainer.batch(0)
    tok = trainer.inputs.tokenizer
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        target = [t for t in labels if t != IGNORE]
        assert target[-1] == tok.token_id("<|im_end|>")
        n = len(target)
        start = next(i for i, t in enumerate(labels) if t != IGNORE)
        assert ids[start : start + n] == target


def test_warmup_then_cosine():
    r = Recipe(steps=100, tower_steps=0, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(r, 0) == 0.1 and lr_at(r, 9) == 1.0
    assert lr_at(r, 100) == 0.1 and 0.1 < lr_at(r, 55) < 1.0


def test_each_stage_warms_up_and_decays_on_its_own():
    r = Recipe(steps=300, tower_steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(r, 0) == 0.1 and lr_at(r, 9) == 1.0 and lr_at(r, 99) < 0.11
    assert lr_at(r, 100) == 0.1 and lr_at(r, 109) == 1.0 and lr_at(r, 300) == 0.1


def test_the_readout_stage_warms_up_to_its_own_peak():
    r = Recipe(steps=300, tower_steps=100, readout_from=200, warmup=10, lr=1.0, readout_lr=0.5)
    assert lr_at(r, 199) < 0.1 and lr_at(r, 200) == 0.05 and lr_at(r, 209) == 0.5
    assert lr_at(r, 300) == pytest.approx(0.025)
    assert [r.stage_at(s) for s in (99, 100, 199, 200)] == ["tower", "whole", "whole", "readout"]


def test_a_readout_step_trains_the_decoder_and_merger_only(tmp_path, one_thread):
    recipe = replace(RECIPE, steps=3, readout_from=1, batch_size=4)
    trainer = Trainer(tmp_path / "m", recipe, log=lambda _: None)
    trainer.train_step()  # the whole model's stage
    visual = trainer.model.model.visual
    rounded = {k: v.to(torch.bfloat16).float() for k, v in visual.state_dict().items()}
    decoder = {k: v.clone() for k, v in trainer.model.model.language_model.state_dict().items()}
    trainer.train_step()
    after = visual.state_dict()
    frozen = [k for k in rounded if not k.startswith("merger.")]
    assert frozen and all(torch.equal(rounded[k], after[k]) for k in frozen), "the tower is frozen"
    assert any(not torch.equal(rounded[k], after[k]) for k in rounded if k.startswith("merger."))
    language = trainer.model.model.language_model.state_dict()
    assert any(not torch.equal(v, language[k]) for k, v in decoder.items())


def test_a_readout_from_an_exported_model_equals_the_uninterrupted_run(tmp_path, one_thread):
    """`--init`: the readout stage started from an exported model (and interrupted once inside it)
    ends in the same bytes as one run through every stage, because the stage starts from the weights
    rounded as an export rounds them, with a fresh optimiser."""
    recipe = replace(RECIPE, steps=4, readout_from=2, batch_size=4, checkpoint_every=1000)
    Trainer(tmp_path / "whole", recipe, log=lambda _: None).run()
    Trainer(tmp_path / "first", replace(recipe, steps=2), log=lambda _: None).run()
    started = Trainer(tmp_path / "second", recipe, log=lambda _: None, init=tmp_path / "first")
    started.start_from(tmp_path / "first")
    started.train_step()
    started.save_checkpoint()
    resumed = Trainer(tmp_path / "second", recipe, log=lambda _: None, init=tmp_path / "first")
    resumed.run()
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    b = (tmp_path / "second" / "model.safetensors").read_bytes()
    assert a == b
    record = json.loads((tmp_path / "second" / "training.json").read_text())
    assert record["init"]["from"]["steps"] == 2 and len(record["init"]["sha256"]) == 64


def test_a_readout_from_a_model_of_other_steps_is_refused(tmp_path):
    """`--init` with a model whose training ended elsewhere than where the readout begins: refused
    with the numbers, before any weight is loaded."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "training.json").write_text(json.dumps({"steps": 5, "wall_minutes": 1.0, "history": []}))
    trainer = Trainer(tmp_path / "m", replace(RECIPE, readout_from=3), log=lambda _: None, init=other)
    with pytest.raises(SystemExit, match="trained for 5 steps; the readout stage starts at 3"):
        trainer.run()
    assert trainer.step == 0 and not trainer.checkpoint_path.exists()


def test_the_tower_stage_draws_its_own_items():
    """Batches of either size never draw an item twice: the full stage's items follow the tower's."""
    r = Recipe(steps=6, tower_steps=3, tower_batch_size=4, batch_size=8)
    spans = [range(first, first + size) for size, first in map(r.batch_at, range(6))]
    drawn = [i for span in spans for i in span]
    assert drawn == list(range(3 * 4 + 3 * 8))


def test_the_tower_stage_sees_mostly_crowded_images():
    """The tower stage draws its tasks from its own weights (many shapes, numbers, videos), the full
    stage from the tasks' own."""
    r = Recipe(steps=400, tower_steps=200, tower_batch_size=16, batch_size=16)
    tower = [t for step in range(200) for t in task_schedule(r.weights_at(step), 7, step, 16)]
    full = [t for step in range(200, 400) for t in task_schedule(r.weights_at(step), 7, step, 16)]
    assert tower.count("count") > 2 * tower.count("shape") and full.count("count") < 2 * full.count("shape")


def test_probe_losses_weigh_covered_tokens_apart():
    """A head whose targets are rare (one token of a hundred covers something) is not trained to say
    "nothing" everywhere: the covered tokens' mean counts as much as the rest's."""
    from serving.training.dense import _balanced

    target = torch.zeros(100, 3)
    target[:, 0] = 1
    target[7] = torch.tensor([0.0, 1.0, 0.0])
    nothing = torch.tensor([5.0, 0.0, 0.0]).expand(100, 3)  # "nothing here" everywhere, confidently
    right = nothing.clone()
    right[7] = torch.tensor([0.0, 5.0, 0.0])
    assert _balanced(target, nothing, "kind") > 4.0  # the covered token's loss is not diluted by 99
    assert _balanced(target, right, "kind") < 0.1


def test_a_tower_step_trains_the_vision_tower_alone(tmp_path, one_thread):
    recipe = replace(RECIPE, steps=2, tower_steps=1, batch_size=4, tower_batch_size=4)
    trainer = Trainer(tmp_path / "m", recipe, log=lambda _: None)
    decoder = {k: v.clone() for k, v in trainer.model.model.language_model.state_dict().items()}
    tower = {k: v.clone() for k, v in trainer.model.model.visual.state_dict().items()}
    trainer.train_step()
    after = trainer.model.model.language_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in decoder.items()), "the decoder is not touched"
    visual = trainer.model.model.visual.state_dict()
    assert any(not torch.equal(v, visual[k]) for k, v in tower.items())


def test_probe_targets_say_what_each_token_covers():
    """A red square over the first merged token and black ink over the last: the targets say so, in
    the order the vision tower emits tokens; a video averages each temporal pair of frames; a number's
    digits are labelled where they are drawn."""
    from PIL import Image

    from serving.evals.drawing import Box, Shape
    from serving.evals.tasks import Scene, draw
    from serving.training.dense import HEADS, TARGETS, token_targets

    image = Image.new("RGB", (112, 56), (255, 255, 255))
    image.paste(Image.new("RGB", (28, 28), (220, 40, 40)), (0, 0))
    image.paste(Image.new("RGB", (28, 28), (0, 0, 0)), (84, 28))
    scene = Scene((Shape("square", "red", Box(0, 0, 28), (220, 40, 40)),))
    targets = token_targets([image], scene, (1, 4, 8), merge=2)
    assert {k: tuple(v.shape) for k, v in targets.items()} == {k: (8, n) for k, n in TARGETS.items()}
    assert targets["place"][:, 0].eq(1).all(), "no number: no digit's place"
    assert targets["colour"][0].tolist() == [0, 1, 0, 0, 0, 0]
    assert targets["colour"][7].tolist() == [0, 0, 0, 0, 0, 1]
    assert targets["kind"][0].tolist() == [0, 0, 1, 0] and targets["kind"][1, 0] == 1
    # One token per shape says "a red shape's centre is here"; none says it elsewhere.
    assert targets["centre"][0].tolist() == [0, 1, 0, 0, 0] and targets["centre"][1:, 0].eq(1).all()
    assert targets["side"][:, 0].eq(1).all(), "one shape: no side"
    blank = Image.new("RGB", (112, 56), (255, 255, 255))
    video = token_targets([image, blank, blank], Scene(), (2, 4, 8), merge=2)
    assert video["colour"].shape == (16, HEADS["colour"])
    assert video["colour"][0, 1] == 0.5 and video["colour"][8, 0] == 1.0  # the last frame fills the pair
    read = draw(3, "read", 5)
    digits = token_targets([read.image], read.scene, (1, 16, 16), merge=2)["digit"]
    seen = {int(c) for c in digits[:, 1:].argmax(-1)[digits[:, 0] < 1]}  # class k + 1 is digit k
    assert seen == {int(ch) for ch in read.answer}
    # Per patch: read left to right along the rows of patches that carry ink, the digits come in
    # the number's order (each digit once, where a digit spans several patches).
    patches = token_targets([read.image], read.scene, (1, 16, 16), merge=2)["subdigit"]
    grid = patches.reshape(8, 8, 2, 2, 11).permute(0, 2, 1, 3, 4).reshape(16, 16, 11)
    inked = grid[..., 0] < 0.5
    columns = [int(grid[:, c][inked[:, c]][:, 1:].sum(0).argmax()) for c in range(16) if inked[:, c].any()]
    read_back = [d for i, d in enumerate(columns) if i == 0 or d != columns[i - 1]]
    assert read_back == [int(ch) for ch in read.answer], (read_back, read.answer)
    # Places: each token's ink by which of the number's digits inked it (the first, second, third),
    # found wherever the digit head finds ink, and the first digit's tokens left of the last's.
    places = token_targets([read.image], read.scene, (1, 16, 16), merge=2)["place"]
    assert (places[:, 1:].sum(1)[digits[:, 0] < 1] > 0).all()
    assert (places[:, 1 + len(read.answer) :] == 0).all()
    column = (torch.arange(64) % 8).float()
    first, last = (float((places[:, k] * column).sum() / places[:, k].sum()) for k in (1, len(read.answer)))
    assert len(read.answer) == 1 or first < last, (first, last)


def test_side_targets_say_which_of_two_shapes_is_left():
    from PIL import Image

    from serving.evals.drawing import Box, Shape
    from serving.evals.tasks import Scene
    from serving.training.dense import token_targets

    image = Image.new("RGB", (112, 56), (255, 255, 255))
    left = Shape("square", "red", Box(0, 0, 28), (220, 40, 40))
    right = Shape("circle", "blue", Box(84, 28, 28), (40, 80, 220))
    targets = token_targets([image], Scene((right, left)), (1, 4, 8), merge=2)
    assert targets["side"][0].tolist() == [0, 1, 0]  # the red square, the left one
    assert targets["side"][7].argmax() == 2  # the blue circle, the right one
    assert targets["centre"][7].tolist() == [0, 0, 0, 1, 0]


def test_prefetched_batches_equal_direct_ones(tmp_path):
    """The worker process draws the same batch for a step as the trainer would itself."""
    from serving.training.batches import step_batch
    from serving.training.prefetch import Prefetcher

    recipe = replace(RECIPE, batch_size=4)
    trainer = Trainer(tmp_path / "m", recipe, log=lambda _: None)
    prefetcher = Prefetcher(str(tmp_path / "m"), recipe)
    try:
        for step in (0, 3):
            fetched, direct = prefetcher.get(step), step_batch(trainer.inputs, recipe, step)
            assert sorted(fetched) == sorted(direct)
            assert all(torch.equal(fetched[k], direct[k]) for k in direct)
    finally:
        prefetcher.close()


def test_scene_slots_summarise_what_was_drawn():
    from serving.evals.tasks import draw
    from serving.training.dense import SLOTS, scene_slots

    count = draw(3, "count", 0).scene
    slots = scene_slots(count).tolist()
    assert len(slots) == len(SLOTS) and sum(slots[:4]) == sum(slots[4:7]) == len(count.shapes)
    assert slots[7:10] == [10, 10, 10] and slots[10] == 0 and slots[11] > 0
    number = draw(3, "read", 0).scene
    digits = [int(c) for c in reversed(str(number.number))] + [10] * (3 - len(str(number.number)))
    assert scene_slots(number).tolist()[7:10] == digits
    motion = draw(3, "motion", 0).scene
    assert scene_slots(motion).tolist()[10] == ("left", "right", "up", "down").index(motion.direction) + 1


def test_the_prefetch_worker_ends_when_its_trainer_is_killed(tmp_path):
    """A trainer killed outright shuts nothing down; its batch worker notices and ends by itself."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from serving.engine.models.builder import build_model

    build_model(tmp_path / "m", "shapes-tiny")
    script = (
        "import sys, time\n"
        "from serving.training.prefetch import Prefetcher\n"
        "from serving.training.recipe import Recipe\n"
        "recipe = Recipe(preset='shapes-tiny', batch_size=2, tower_steps=0)\n"
        f"p = Prefetcher({str(tmp_path / 'm')!r}, recipe)\n"
        "p.get(0)\n"
        "print(*p.pool._processes, flush=True)\n"
        "time.sleep(120)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        (worker,) = (int(pid) for pid in trainer.stdout.readline().split())
        os.kill(worker, 0)  # alive while its trainer is
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        pytest.fail(f"the worker {worker} outlived its trainer")
    finally:
        trainer.kill()
