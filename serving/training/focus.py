"""Auxiliary losses that teach decoder heads the lookup that `side` and `count_colour` need: find the
colour the question names, then that colour's shapes in the image.

Why: the tasks the trained model first answered well (colour, shape, count, motion) need no choice
among the image's shapes. For the ones it did not, the named shape's own image tokens carried its side
(a probe read it at 0.99 from every decoder layer), while the answering position carried none: what
lagged was the lookup. Supervised in one step at the answering position (its attention onto the named
colour's tokens, so the answer would have had to find the colour word first), a head learned to look
at every shape, and the answers did not move. So the lookup is taught as steps that each need nothing
found before them: the **look**, at the question's colour word, whose own embedding names the colour,
onto that colour's image tokens; the **count**, from the same word, onto one token per shape of that
colour and onto itself (`FocusRows` says why); and the **relay**, at the answering position, onto the
colour word, which then holds what the two found. Trained so from the 6,000-step weights (two stages,
2,500 steps), `side` went from 49 to 100 % and `count_colour` from 26 to 66 % (docs/evals.md). The
**read** is the same idea for numbers: at each position that predicts a digit, onto that digit's ink
(tried, not shipped). All are off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from serving.evals.drawing import COLOURS

# The tasks whose question names the colour of what it asks about, and the colour classes of the
# probes' colour head (0 background, then COLOURS in order, then ink).
FOCUS_TASKS = ("shape", "count_colour", "side")
COLOUR_CLASS = {name: i + 1 for i, name in enumerate(COLOURS)}
# `count` asks about every shape: its count and relay start from the word "shapes" instead.
EVERY = -1


def named_colour(task: str, prompt: str) -> int:
    """The colour class the question names, EVERY where it counts every shape, or 0 for neither."""
    if task == "count":
        return EVERY
    if task not in FOCUS_TASKS:
        return 0
    words = {w.strip("?.,").lower() for w in prompt.split()}
    found = [c for name, c in COLOUR_CLASS.items() if name in words]
    return found[0] if len(found) == 1 else 0


def anchor_word(colour: int) -> str:
    """The question's word the supervised attentions start from (after a space, as tokenized)."""
    return " shapes" if colour == EVERY else " " + next(k for k, v in COLOUR_CLASS.items() if v == colour)


def colour_word_at(token_ids: list[int], word: list[int], end: int) -> int:
    """The position of the last token of the last occurrence of `word` (the colour's tokens) before
    `end`, or -1."""
    n = len(word)
    for start in range(end - n, -1, -1):
        if token_ids[start : start + n] == word:
            return start + n - 1
    return -1


# The supervised attentions, each a (query, target) pair per example, or per digit for `read` (below).
ATTENTIONS = ("look", "count", "relay", "read")
# The most digits a `read` answer has (0-999).
DIGITS = 3


@dataclass(frozen=True)
class FocusRows:
    """Per example, the supervised attentions (a query position of -1 means none):
    - look: from the question's colour word onto the named colour's image tokens (their colour share);
    - count: from the colour word onto one token per shape of that colour (where its centre falls)
      and onto itself, equally: the share it keeps on itself, 1 / (n + 1), says how many there are
      (attention that only looked at the shapes would average their count away);
    - relay: from the answering position (the last prompt token) onto the colour word, which holds
      what the two found;
    - read: from the position that predicts a number's k-th digit (the last prompt token, then each
      digit of the answer) onto the image tokens inked by that digit (their share of its ink): one
      row per digit, (B, DIGITS) queries and (B, DIGITS, width) targets. Why: the digits' own tokens
      carry which digit they are (a linear probe read it at 0.56-0.74) while the positions that
      answer carried next to nothing (0.13-0.23). Taught from the 8,500-step weights, the head put
      0.70 of its attention on its digit within 400 steps, and the positions still carried nothing
      (docs/evals.md): not shipped."""

    look_query: torch.Tensor  # (B,)
    look_target: torch.Tensor  # (B, width), rows summing to 1 or all 0
    count_query: torch.Tensor
    count_target: torch.Tensor
    relay_query: torch.Tensor
    relay_target: torch.Tensor
    read_query: torch.Tensor  # (B, DIGITS)
    read_target: torch.Tensor  # (B, DIGITS, width)

    def pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_query"), getattr(self, f"{name}_target")


def focus_rows(
    colour_shares: list[torch.Tensor],
    centres: list[torch.Tensor],
    colours: list[int],
    colour_at: list[int],
    prompt_lens: list[int],
    image_rows: list[torch.Tensor],
    width: int,
    places: list[torch.Tensor],
) -> FocusRows:
    """`colour_shares`, `centres` and `places` are the (visual tokens, classes) colour, centre and
    place targets (serving/training/dense.py), `image_rows` the sequence positions of the example's
    image tokens in the same order, `colour_at` the position of the question's colour word."""
    b = len(colours)
    query = {name: torch.full((b,), -1, dtype=torch.long) for name in ATTENTIONS}
    target = {name: torch.zeros((b, width)) for name in ATTENTIONS}
    query["read"] = torch.full((b, DIGITS), -1, dtype=torch.long)
    target["read"] = torch.zeros((b, DIGITS, width))
    for i, (place, n, rows) in enumerate(zip(places, prompt_lens, image_rows, strict=True)):
        if len(rows) != len(place):
            continue
        for k in range(DIGITS):
            ink = place[:, k + 1].float()
            if float(ink.sum()) > 0:
                query["read"][i, k] = n - 1 + k
                target["read"][i, k, rows] = ink / ink.sum()
    for i, (shares, centre, colour, at, n, rows) in enumerate(
        zip(colour_shares, centres, colours, colour_at, prompt_lens, image_rows, strict=True)
    ):
        if colour == 0 or at < 0 or len(rows) != len(shares):
            continue
        # The answer reads the colour word even where that colour is absent (count_colour's 0).
        query["relay"][i] = n - 1
        target["relay"][i, at] = 1.0
        mine = rows[(centre[:, 1:] if colour == EVERY else centre[:, colour : colour + 1]).sum(1) > 0]
        query["count"][i] = at
        target["count"][i, mine] = 1.0
        target["count"][i, at] = 1.0
        target["count"][i] /= len(mine) + 1
        if colour == EVERY:  # counting every shape: nothing to pick out
            continue
        weight = shares[:, colour].float()
        total = float(weight.sum())
        if total > 0:
            query["look"][i] = at
            target["look"][i, rows] = weight / total
    return FocusRows(
        **{f"{k}_{part}": d[k] for k in ATTENTIONS for part, d in (("query", query), ("target", target))}
    )


class AttentionFocus:
    """Captures one decoder layer's input on each forward pass and computes a head's attention at given
    query rows from it; `close_pass` drops the capture once read."""

    def __init__(self, model: nn.Module, layer: int, head: int = 0) -> None:
        self.attn = model.model.language_model.layers[layer].self_attn
        self.head = head
        self._input: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._hook = self.attn.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._input = (hidden, kwargs["position_embeddings"])

    def close_pass(self) -> None:
        self._input = None

    def loss(
        self, query: torch.Tensor, target: torch.Tensor, head: int | None = None
    ) -> tuple[torch.Tensor, float]:
        """(cross-entropy of `head`'s attention (default: this focus's head) against `target` at the
        `query` positions, the mean attention share on the target's tokens); zero and nan when no
        example has a query. `query` is (B,) with `target` (B, width), or (B, K) with (B, K, width)
        for several rows per example."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

        assert self._input is not None, "no forward pass captured"
        hidden, (cos, sin) = self._input
        head = self.head if head is None else head
        example = torch.arange(query.shape[0])
        if query.dim() == 2:
            example = example.repeat_interleave(query.shape[1])
            query, target = query.reshape(-1), target.reshape(-1, target.shape[-1])
        rows = (query >= 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return hidden.new_zeros(()), float("nan")
        a = self.attn
        dim = a.head_dim
        kv_head = head // (a.config.num_attention_heads // a.config.num_key_value_heads)
        at = query[rows]
        # Keys once per example with a row (a read example has up to DIGITS rows), then per row.
        used, of_row = example[rows].unique(return_inverse=True)
        h, c, s = hidden[used], cos[used], sin[used]  # (E, T, ·)
        k = a.k_proj(h)[..., kv_head * dim : (kv_head + 1) * dim]
        k = (k * c + rotate_half(k) * s)[of_row]  # (R, T, dim)
        q = a.q_proj(h[of_row, at])[:, head * dim : (head + 1) * dim]
        q = q * c[of_row, at] + rotate_half(q) * s[of_row, at]
        scores = torch.einsum("rtd,rd->rt", k, q) * a.scaling
        later = torch.arange(scores.shape[1]) > at[:, None]
        logp = F.log_softmax(scores.masked_fill(later, float("-inf")), dim=-1)
        t = target[rows]
        loss = -torch.where(t > 0, t * logp, torch.zeros_like(logp)).sum(-1).mean()
        mass = float((logp.detach().exp() * (t > 0)).sum(-1).mean())
        return loss, mass
