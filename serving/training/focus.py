"""An auxiliary loss that teaches one decoder head where to look: at the position that predicts the
answer, its attention over the prompt should fall on the image tokens of the colour the question names.

Why: the tasks the trained model answers well (colour, shape, count, motion) need no choice among the
image's shapes, and the ones it does not (`side`, `count_colour`) need the answer's position to find
the named colour in the question, then the tokens of that colour in the image, from the answers' loss
alone. The probes read what those answers need from the merged tokens (side at 0.91 per token), so
what lags is that lookup. This loss supervises it directly, on one head of one layer: cross-entropy
between the head's attention at the last prompt token and the named colour's share of each image
token, normalised over the image. Measured on the shipped weights (docs/evals.md): the head learned to
look at every shape rather than the named one, and the answers did not move; it stays off by default.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from serving.evals.drawing import COLOURS

# The tasks whose question names the colour of what it asks about, and the colour classes of the
# probes' colour head (0 background, then COLOURS in order, then ink).
FOCUS_TASKS = ("shape", "count_colour", "side")
COLOUR_CLASS = {name: i + 1 for i, name in enumerate(COLOURS)}


def named_colour(task: str, prompt: str) -> int:
    """The colour class the question names, or 0 where the task has no such colour."""
    if task not in FOCUS_TASKS:
        return 0
    words = {w.strip("?.,").lower() for w in prompt.split()}
    found = [c for name, c in COLOUR_CLASS.items() if name in words]
    return found[0] if len(found) == 1 else 0


def focus_rows(
    colour_shares: list[torch.Tensor],
    colours: list[int],
    prompt_lens: list[int],
    image_rows: list[torch.Tensor],
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the query position (its last prompt token, or -1 for none) and the target over the
    padded sequence (the named colour's share of each image token, summing to 1). `colour_shares` are
    the probes' (visual tokens, classes) colour targets, `image_rows` the sequence positions of the
    example's image tokens in the same order."""
    query = torch.full((len(colours),), -1, dtype=torch.long)
    target = torch.zeros((len(colours), width))
    for i, (shares, colour, n, rows) in enumerate(
        zip(colour_shares, colours, prompt_lens, image_rows, strict=True)
    ):
        if colour == 0 or len(rows) != len(shares):
            continue
        weight = shares[:, colour].float()
        total = float(weight.sum())
        if total <= 0:  # count_colour with none of that colour: nothing to look at
            continue
        query[i] = n - 1
        target[i, rows] = weight / total
    return query, target


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
        example has a query."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

        assert self._input is not None, "no forward pass captured"
        hidden, (cos, sin) = self._input
        head = self.head if head is None else head
        rows = (query >= 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return hidden.new_zeros(()), float("nan")
        a = self.attn
        dim = a.head_dim
        kv_head = head // (a.config.num_attention_heads // a.config.num_key_value_heads)
        at = query[rows]
        h = hidden[rows]  # (R, T, hidden)
        q = a.q_proj(h[torch.arange(len(rows)), at])[:, head * dim : (head + 1) * dim]
        k = a.k_proj(h)[..., kv_head * dim : (kv_head + 1) * dim]
        c, s = cos[rows], sin[rows]  # (R, T, dim)
        cq, sq = c[torch.arange(len(rows)), at], s[torch.arange(len(rows)), at]
        q = q * cq + rotate_half(q) * sq
        k = k * c + rotate_half(k) * s
        scores = torch.einsum("rtd,rd->rt", k, q) * a.scaling
        later = torch.arange(scores.shape[1]) > at[:, None]
        logp = F.log_softmax(scores.masked_fill(later, float("-inf")), dim=-1)
        t = target[rows]
        loss = -torch.where(t > 0, t * logp, torch.zeros_like(logp)).sum(-1).mean()
        mass = float((logp.detach().exp() * (t > 0)).sum(-1).mean())
        return loss, mass
