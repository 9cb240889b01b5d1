"""Where the `read` answer is lost (`python -m benchmarks.read_readout [--model DIR]`).

Linear probes (ten digits, fitted on training-seed `read` items, scored on held-out ones), per digit
of the number (first, second, third):
  - on the image tokens that digit inks (their mean, weighted by its ink in each: the `place` target),
    at every decoder layer's input: does the model see which digit it is?
  - at the position that predicts that digit (the last prompt token, then each digit of the answer,
    teacher-forced), at every layer's input and the output: does it reach the answer?
"""

from __future__ import annotations

import torch

from benchmarks.probes import HELD_OUT_SEED, arguments, load, probe
from serving.evals.tasks import draw
from serving.training.batches import collate, draw_example, pop_focus, pop_probe_targets
from serving.training.focus import DIGITS
from serving.training.recipe import TRAIN_SEED


def main() -> None:
    args = arguments(__doc__, test_items=150)
    inputs, model, pad = load(args.model)
    cfg = inputs.model_config

    def measure(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(own tokens' mean per layer, predicting position per layer, (place, digit)) per digit."""
        own, answer, labels = [], [], []
        for start in range(0, n, 24):
            idx = range(start, min(n, start + 24))
            examples = [draw_example(inputs, seed, "read", i) for i in idx]
            batch = collate(examples, *pad)
            batch.pop("labels")
            pop_probe_targets(batch)
            pop_focus(batch)
            with torch.no_grad():
                hidden = model(**batch, output_hidden_states=True).hidden_states
            for b, (i, e) in enumerate(zip(idx, examples, strict=True)):
                rows = (batch["input_ids"][b] == cfg.image_token_id).nonzero().squeeze(1)
                image = torch.stack([h[b, rows] for h in hidden], 1)  # (tokens, layers, hidden)
                for k, digit in enumerate(draw(seed, "read", i).answer[:DIGITS]):
                    ink = e.targets["place"][:, k + 1]
                    if float(ink.sum()) == 0:
                        continue
                    own.append(torch.einsum("t,tlh->lh", ink / ink.sum(), image))
                    answer.append(torch.stack([h[b, e.prompt_len - 1 + k] for h in hidden]))
                    labels.append((k, int(digit)))
        return torch.stack(own), torch.stack(answer), torch.tensor(labels)

    train_own, train_answer, train_y = measure(TRAIN_SEED, args.train_items)
    test_own, test_answer, test_y = measure(HELD_OUT_SEED, args.test_items)
    print(
        f"{args.model}: read; probes fit on {args.train_items} training items, "
        f"scored on {args.test_items} held out"
    )
    print(
        "| digit | items (train / test) | where | "
        + " | ".join(f"layer {i}" for i in range(train_own.shape[1] - 1))
        + " | output |"
    )
    print("|---|---|---|" + "---:|" * train_own.shape[1])
    for k in range(DIGITS):
        a, b = train_y[:, 0] == k, test_y[:, 0] == k
        if int(a.sum()) < 20 or int(b.sum()) < 10:
            continue
        for name, tr, te in (
            ("its ink's tokens", train_own, test_own),
            ("predicting position", train_answer, test_answer),
        ):
            fits = [
                probe(tr[a][:, layer], train_y[a, 1], te[b][:, layer], test_y[b, 1], classes=10)
                for layer in range(tr.shape[1])
            ]
            print(
                f"| {k + 1} | {int(a.sum())} / {int(b.sum())} | {name} | "
                + " | ".join(f"{f:.2f}" for f in fits)
                + " |"
            )


if __name__ == "__main__":
    main()
