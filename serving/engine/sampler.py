"""Token sampling for a batch: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import torch

from serving.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits (B, V) float32 → one token per sequence (and its logprobs where asked for).

    Sampled rows draw from their own request's generator, so a seeded request gives the same tokens
    whatever else shares its batch.
    """
    logits = logits.float()
    for i, seq in enumerate(seqs):
        if suppressed := seq.suppressed_token_ids:
            logits[i, list(suppressed)] = float("-inf")
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        probs = _filtered_probs(logits[sampled], [seqs[i] for i in sampled])
        for row, i in enumerate(sampled):
            tokens[i] = torch.multinomial(probs[row], 1, generator=seqs[i].generator)[0]
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, token_list, seqs)


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)[:, None]
    logits = logits / temps
    ranked, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1])[None, :]
    top_k = torch.tensor([s.params.top_k or logits.shape[-1] for s in seqs])[:, None]
    ranked = ranked.masked_fill(rank >= top_k, float("-inf"))
    probs = ranked.softmax(dim=-1)
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=logits.dtype)[:, None]
    # Drop a token once the tokens ranked above it already cover top_p (the best one always stays).
    beyond = (probs.cumsum(dim=-1) - probs) >= top_p
    ranked = ranked.masked_fill(beyond, float("-inf"))
    return torch.zeros_like(logits).scatter_(-1, order, ranked.softmax(dim=-1))


def _logprobs(logits: torch.Tensor, tokens: list[int], seqs: list[Sequence]) -> list[dict[int, float] | None]:
    wanted = [s.params.logprobs for s in seqs]
    if all(w is None for w in wanted):
        return [None] * len(seqs)
    logp = logits.log_softmax(dim=-1)
    out: list[dict[int, float] | None] = []
    for i, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        entry = {tokens[i]: float(logp[i, tokens[i]])}
        if n:
            values, ids = logp[i].topk(n)
            entry.update(zip(ids.tolist(), values.tolist(), strict=True))
        out.append(entry)
    return out
