"""Where the `count` and `count_colour` answers are lost (`python -m benchmarks.count_readout [--model DIR]`).

Linear probes (six classes, the count 0-5; fitted on training-seed items, scored on held-out ones),
per task, at every decoder layer's input and at the output:
  - at the question's counting word (`shapes`, or the colour named), the position the supervised
    count attention reads from: does the count reach it, and from which layer?
  - at the answering position (the last prompt token): does it reach the answer?
  - over the image tokens (their sum): is the count there to be read, before any attention?
"""

from __future__ import annotations

import torch

from benchmarks.probes import HELD_OUT_SEED, arguments, load, probe
from serving.evals.tasks import draw
from serving.training.batches import collate, draw_example, pop_focus, pop_probe_targets
from serving.training.recipe import TRAIN_SEED

TASKS = ("count", "count_colour")


def main() -> None:
    args = arguments(__doc__, test_items=150)
    inputs, model, pad = load(args.model)

    def measure(task: str, seed: int, n: int) -> tuple[torch.Tensor, ...]:
        """(counting word, answering position, image tokens' sum; each per layer) and the count."""
        word, answer, image, labels = [], [], [], []
        for start in range(0, n, 24):
            idx = range(start, min(n, start + 24))
            examples = [draw_example(inputs, seed, task, i) for i in idx]
            batch = collate(examples, *pad)
            batch.pop("labels")
            pop_probe_targets(batch)
            at = pop_focus(batch).count_query
            with torch.no_grad():
                hidden = model(**batch, output_hidden_states=True).hidden_states
            for b, (i, e) in enumerate(zip(idx, examples, strict=True)):
                if int(at[b]) < 0:
                    continue
                word.append(torch.stack([h[b, int(at[b])] for h in hidden]))
                rows = batch["input_ids"][b] == inputs.model_config.image_token_id
                image.append(torch.stack([h[b, rows].sum(0) for h in hidden]))
                answer.append(torch.stack([h[b, e.prompt_len - 1] for h in hidden]))
                labels.append(int(draw(seed, task, i).answer))
        return torch.stack(word), torch.stack(answer), torch.stack(image), torch.tensor(labels)

    print(
        f"{args.model}: probes fit on {args.train_items} training items per task, {args.test_items} held out"
    )
    for task in TASKS:
        train_word, train_answer, train_image, train_y = measure(task, TRAIN_SEED, args.train_items)
        test_word, test_answer, test_image, test_y = measure(task, HELD_OUT_SEED, args.test_items)
        layers = train_word.shape[1]
        print(f"\n{task}: held-out counts {torch.bincount(test_y, minlength=6).tolist()} (0-5)")
        print("| where | " + " | ".join(f"layer {i}" for i in range(layers - 1)) + " | output |")
        print("|---|" + "---:|" * layers)
        for name, tr, te in (
            ("counting word", train_word, test_word),
            ("answering position", train_answer, test_answer),
            ("image tokens' sum", train_image, test_image),
        ):
            fits = [probe(tr[:, k], train_y, te[:, k], test_y, classes=6) for k in range(layers)]
            print(f"| {name} | " + " | ".join(f"{f:.2f}" for f in fits) + " |")


if __name__ == "__main__":
    main()
