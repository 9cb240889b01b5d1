"""Linear probes for the readout diagnostics (`side_readout`, `read_readout`): the model they load,
and a held-out accuracy from L2-regularised logistic regression on standardised features."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from serving.config import default_model
from serving.engine.inputs import InputProcessor
from serving.training.trainer import exported_model

HELD_OUT_SEED = 4242


def arguments(doc: str, test_items: int) -> argparse.Namespace:
    """`--model`, `--train-items` and `--test-items`, described by the script's first doc line."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", type=Path, default=default_model())
    p.add_argument("--train-items", type=int, default=480)
    p.add_argument("--test-items", type=int, default=test_items)
    return p.parse_args()


def load(model_dir: Path) -> tuple[InputProcessor, torch.nn.Module, tuple[int, int, int]]:
    """The model's input processor, its `transformers` model, and `collate`'s pad arguments."""
    torch.manual_seed(0)
    inputs = InputProcessor.from_dir(str(model_dir))
    cfg = inputs.model_config
    pad = (inputs.tokenizer.token_id("<|endoftext|>"), cfg.image_token_id, cfg.video_token_id)
    return inputs, exported_model(model_dir), pad


def probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, classes: int = 2
) -> float:
    """Held-out accuracy: two classes from float 0/1 labels (one logit), more from class indices."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    out = 1 if classes == 2 else classes
    w = torch.zeros(a.shape[1], out, requires_grad=True)
    c = torch.zeros(out, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = a @ w + c
        fit = (
            F.binary_cross_entropy_with_logits(z[:, 0], train_y)
            if classes == 2
            else F.cross_entropy(z, train_y)
        )
        loss = fit + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        z = b @ w + c
        guess = (z[:, 0] > 0).float() if classes == 2 else z.argmax(1)
        return float((guess == test_y).float().mean())
