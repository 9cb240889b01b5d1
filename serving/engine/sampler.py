"""Token sampling for a batch: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

No request's parameters or logits can make sampling raise: NaN logits count as -inf, +inf as the
largest finite value, top-k is clamped to the vocabulary, logits are shifted by their row maximum
before dividing by the temperature (so a tiny temperature cannot overflow), and a row left without a
usable distribution is decided greedily.
"""

from __future__ import annotations

import torch

from serving.engine.sequence import Sequence

LOGPROB_FLOOR = -9999.0  # what a -inf logprob is reported as (JSON has no infinities), as vLLM does


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits (B, V) float32 → one token per sequence (and its logprobs where asked for).

    Sampled rows draw from their own request's generator, so a seeded request gives the same tokens
    whatever else shares its batch.
    """
    logits = sanitize(logits.float())
    vocab = logits.shape[-1]
    for i, seq in enumerate(seqs):
        if suppressed := [t for t in seq.suppressed_token_ids if 0 <= t < vocab]:
            logits[i, suppressed] = float("-inf")
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        probs = _filtered_probs(logits[sampled], [seqs[i] for i in sampled])
        # A row with nothing left to draw from (every logit -inf or NaN) keeps its argmax.
        usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
        for row, i in enumerate(sampled):
            if usable[row]:
                tokens[i] = torch.multinomial(probs[row], 1, generator=seqs[i].generator)[0]
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, token_list, seqs)


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """NaN → -inf (never chosen), +inf → the largest finite float (chosen, without poisoning softmax)."""
    return torch.nan_to_num(
        logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf")
    )


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    vocab = logits.shape[-1]
    # Greedy temperatures never reach here (SamplingParams normalises them); the floor keeps a
    # hand-built one from dividing by zero.
    temps = torch.tensor([max(s.params.temperature, 1e-5) for s in seqs], dtype=logits.dtype)[:, None]
    # Shift by the row maximum first: every finite entry becomes <= 0, so dividing by a small temperature
    # can only go towards -inf (probability 0), never to +inf or NaN. Rows that are all -inf stay so.
    row_max = logits.max(dim=-1, keepdim=True).values
    shifted = torch.where(torch.isfinite(row_max), logits - row_max, logits)
    logits = torch.nan_to_num(shifted / temps, nan=float("-inf"))
    ranked, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab)[None, :]
    top_k = torch.tensor([min(s.params.top_k, vocab) or vocab for s in seqs])[:, None]
    ranked = ranked.masked_fill(rank >= top_k, float("-inf"))
    probs = ranked.softmax(dim=-1)
    top_p = torch.tensor([s.params.top_p for s in seqs], dtype=logits.dtype)[:, None]
    # Drop a token once the tokens ranked above it already cover top_p (the best one always stays).
    beyond = (probs.cumsum(dim=-1) - probs) >= top_p
    beyond[:, 0] = False
    ranked = ranked.masked_fill(beyond, float("-inf"))
    return torch.zeros_like(logits).scatter_(-1, order, ranked.softmax(dim=-1))


def _logprobs(logits: torch.Tensor, tokens: list[int], seqs: list[Sequence]) -> list[dict[int, float] | None]:
    wanted = [s.params.logprobs for s in seqs]
    if all(w is None for w in wanted):
        return [None] * len(seqs)
    logp = torch.nan_to_num(logits.log_softmax(dim=-1), nan=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)
    out: list[dict[int, float] | None] = []
    for i, n in enumerate(wanted):
        if n is None:
            out.append(None)
            continue
        entry = {tokens[i]: float(logp[i, tokens[i]])}
        if n := min(n, logp.shape[-1]):
            values, ids = logp[i].topk(n)
            entry.update(zip(ids.tolist(), values.tolist(), strict=True))
        out.append(entry)
    return out
