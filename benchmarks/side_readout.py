"""Where the `side` answer is lost inside the decoder (`python -m benchmarks.side_readout [--model DIR]`).

Measurements on `side` items, layer by layer of the decoder, each a linear probe fitted on
training-seed items and scored on held-out ones (or an attention share):
  - the named shape's own image tokens (their mean, weighted by the named colour's share): does the
    left/right of the asked-about shape lie in them?
  - the question's colour word and the last prompt token (the position whose logits give the answer):
    does it reach the word, then the position that answers?
  - each head's attention at the colour word on the named shape's tokens against the other shape's
    (the look), at the answering position likewise, and at the answering position on the colour word
    (the relay): does any head pick the asked-about shape, and carry it to the answer?
"""

from __future__ import annotations

import torch

from benchmarks.probes import HELD_OUT_SEED, arguments, load, probe
from serving.evals.tasks import draw
from serving.training.batches import collate, draw_example, pop_focus, pop_probe_targets
from serving.training.focus import COLOUR_CLASS, AttentionFocus, focus_rows
from serving.training.recipe import TRAIN_SEED


def main() -> None:
    args = arguments(__doc__, test_items=144)
    inputs, model, pad = load(args.model)
    cfg = inputs.model_config
    layers = model.model.language_model.layers
    heads = model.config.text_config.num_attention_heads
    foci = [AttentionFocus(model, layer) for layer in range(len(layers))]

    def measure(seed: int, n: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        named_x, word_x, answer_x, labels, shares = [], [], [], [], []
        for start in range(0, n, 24):
            idx = range(start, min(n, start + 24))
            examples = [draw_example(inputs, seed, "side", i) for i in idx]
            drawn = [draw(seed, "side", i) for i in idx]
            batch = collate(examples, *pad)
            batch.pop("labels")
            pop_probe_targets(batch)
            rows = pop_focus(batch)
            other = [
                next(COLOUR_CLASS[s.colour] for s in d.scene.shapes if COLOUR_CLASS[s.colour] != e.focus)
                for d, e in zip(drawn, examples, strict=True)
            ]
            others = focus_rows(
                [e.targets["colour"] for e in examples],
                [e.targets["centre"] for e in examples],
                other,
                [e.colour_at for e in examples],
                [e.prompt_len for e in examples],
                [(batch["input_ids"][i] == cfg.image_token_id).nonzero().squeeze(1) for i in range(len(idx))],
                batch["input_ids"].shape[1],
                [e.targets["place"] for e in examples],
            )
            pairs = (
                (rows.look_query, rows.look_target),
                (rows.look_query, others.look_target),
                (rows.relay_query, rows.look_target),
                (rows.relay_query, others.look_target),
                (rows.relay_query, rows.relay_target),
            )
            with torch.no_grad():
                hidden = model(**batch, output_hidden_states=True).hidden_states
                per_layer = []
                for f in foci:
                    per_layer.append([[f.loss(q, t, h)[1] for q, t in pairs] for h in range(heads)])
                    f.close_pass()
            shares.append(torch.tensor(per_layer) * len(idx))
            at = torch.arange(len(idx))
            word_x.append(torch.stack([h[at, rows.look_query] for h in hidden], 1))
            answer_x.append(torch.stack([h[at, rows.relay_query] for h in hidden], 1))
            named_x.append(torch.stack([torch.einsum("bt,bth->bh", rows.look_target, h) for h in hidden], 1))
            labels += [1.0 if d.answer == "right" else 0.0 for d in drawn]
        features = [torch.cat(named_x), torch.cat(word_x), torch.cat(answer_x)]
        return features, torch.tensor(labels), sum(shares) / n

    train_x, train_y, _ = measure(TRAIN_SEED, args.train_items)
    test_x, test_y, share = measure(HELD_OUT_SEED, args.test_items)
    print(
        f"{args.model}: side; probes fit on {args.train_items} training items, "
        f"scored on {args.test_items} held out"
    )
    print(
        "| decoder layer input | named shape's tokens | colour word | answer position "
        "| look: named / other, per head | answer: named / other | relay: answer on the word |"
    )
    print("|---:|---:|---:|---:|---|---|---|")
    for layer in range(train_x[0].shape[1]):
        splits = zip(train_x, test_x, strict=True)
        fits = [probe(a[:, layer], train_y, b[:, layer], test_y) for a, b in splits]
        probes = " | ".join(f"{fit:.2f}" for fit in fits)
        if layer < len(layers):
            look = " ".join(f"{share[layer, h, 0]:.2f}/{share[layer, h, 1]:.2f}" for h in range(heads))
            answer = " ".join(f"{share[layer, h, 2]:.2f}/{share[layer, h, 3]:.2f}" for h in range(heads))
            relay = " ".join(f"{share[layer, h, 4]:.2f}" for h in range(heads))
            where = str(layer)
        else:
            look = answer = relay = ""
            where = "output (final norm)"
        print(f"| {where} | {probes} | {look} | {answer} | {relay} |")


if __name__ == "__main__":
    main()
