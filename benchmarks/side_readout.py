"""Where the `side` answer is lost inside the decoder (`python -m benchmarks.side_readout [--model DIR]`).

Three measurements on `side` items, layer by layer of the decoder, each a linear probe fitted on
training-seed items and scored on held-out ones (or an attention share):
  - the named shape's own image tokens (their mean, weighted by the named colour's share): does the
    left/right of the asked-about shape lie in them?
  - the last prompt token's residual stream (the position whose logits give the answer): does it
    reach the position that answers?
  - each head's attention at that position on the named shape's tokens against the other shape's:
    does any head look at the asked-about shape rather than at both?
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from serving.config import default_model
from serving.engine.inputs import InputProcessor
from serving.evals.tasks import draw
from serving.training.batches import collate, draw_example, pop_focus, pop_probe_targets
from serving.training.focus import COLOUR_CLASS, AttentionFocus, focus_rows
from serving.training.recipe import TRAIN_SEED
from serving.training.trainer import exported_model

HELD_OUT_SEED = 4242


def _probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> float:
    """Held-out accuracy of an L2-regularised logistic probe on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a @ w + c, train_y) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((b @ w + c > 0).float() == test_y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=default_model())
    p.add_argument("--train-items", type=int, default=480)
    p.add_argument("--test-items", type=int, default=144)
    args = p.parse_args()
    torch.manual_seed(0)
    inputs = InputProcessor.from_dir(str(args.model))
    model = exported_model(args.model)
    cfg = inputs.model_config
    pad = (inputs.tokenizer.token_id("<|endoftext|>"), cfg.image_token_id, cfg.video_token_id)
    layers = model.model.language_model.layers
    heads = model.config.text_config.num_attention_heads
    foci = [AttentionFocus(model, layer) for layer in range(len(layers))]

    def measure(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        named_x, answer_x, labels, shares = [], [], [], []
        for start in range(0, n, 24):
            idx = range(start, min(n, start + 24))
            examples = [draw_example(inputs, seed, "side", i) for i in idx]
            drawn = [draw(seed, "side", i) for i in idx]
            batch = collate(examples, *pad)
            batch.pop("labels")
            pop_probe_targets(batch)
            query, target = pop_focus(batch)
            other = [
                next(COLOUR_CLASS[s.colour] for s in d.scene.shapes if COLOUR_CLASS[s.colour] != e.focus)
                for d, e in zip(drawn, examples, strict=True)
            ]
            rows = [
                (batch["input_ids"][i] == cfg.image_token_id).nonzero().squeeze(1) for i in range(len(idx))
            ]
            query2, target2 = focus_rows(
                [e.targets["colour"] for e in examples],
                other,
                [e.prompt_len for e in examples],
                rows,
                batch["input_ids"].shape[1],
            )
            with torch.no_grad():
                hidden = model(**batch, output_hidden_states=True).hidden_states
                per_layer = []
                for f in foci:
                    per_layer.append(
                        [(f.loss(query, target, h)[1], f.loss(query2, target2, h)[1]) for h in range(heads)]
                    )
                    f.close_pass()
            shares.append(torch.tensor(per_layer) * len(idx))
            at = torch.arange(len(idx))
            answer_x.append(torch.stack([h[at, query] for h in hidden], 1))
            weights = target / target.sum(1, keepdim=True)
            named_x.append(torch.stack([torch.einsum("bt,bth->bh", weights, h) for h in hidden], 1))
            labels += [1.0 if d.answer == "right" else 0.0 for d in drawn]
        return torch.cat(named_x), torch.cat(answer_x), torch.tensor(labels), sum(shares) / n

    tr_named, tr_answer, tr_y, _ = measure(TRAIN_SEED, args.train_items)
    te_named, te_answer, te_y, share = measure(HELD_OUT_SEED, args.test_items)
    print(
        f"{args.model}: side; probes fit on {args.train_items} training items, "
        f"scored on {args.test_items} held out"
    )
    print(
        "| decoder layer input | named shape's tokens | answer position | attention named / other, per head |"
    )
    print("|---:|---:|---:|---|")
    for layer in range(tr_named.shape[1]):
        named = _probe(tr_named[:, layer], tr_y, te_named[:, layer], te_y)
        answer = _probe(tr_answer[:, layer], tr_y, te_answer[:, layer], te_y)
        if layer < len(layers):
            looks = " ".join(f"{share[layer, h, 0]:.2f}/{share[layer, h, 1]:.2f}" for h in range(heads))
            where = str(layer)
        else:
            looks, where = "", "output (final norm)"
        print(f"| {where} | {named:.2f} | {answer:.2f} | {looks} |")


if __name__ == "__main__":
    main()
