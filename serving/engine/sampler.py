"""Token sampling for a batch: greedy, temperature, min-p, top-k, top-p, per-request seeds, logprobs;
and what changes the logits before any of it: penalties, logit bias and the grammar's token mask.

Order per step, as vLLM's: stop tokens suppressed under min_tokens; repetition, frequency and presence
penalties; logit bias; the grammar's mask; then greedy argmax, or temperature, min-p, top-k and top-p
before drawing. Logprobs report the model's distribution (after min_tokens' suppression), not the
processed one, as vLLM's default does. Each processor is one batched tensor operation over the rows
that use it, built on the host and copied to the logits' device once per step.

No request's parameters or logits can make sampling raise: NaN logits count as -inf, +inf as the
largest finite value, top-k is clamped to the vocabulary, logits are shifted by their row maximum
before dividing by the temperature (so a tiny temperature cannot overflow), and a row left without a
usable distribution is decided greedily.
"""

from __future__ import annotations

import torch

from serving.engine import structured
from serving.engine.sequence import Sequence

LOGPROB_FLOOR = -9999.0  # what a -inf logprob is reported as (JSON has no infinities), as vLLM does


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
    """logits (B, V) float32 → one token per sequence (and its logprobs where asked for).

    Sampled rows draw from their own request's random source, so a seeded request gives the same
    tokens whatever else shares its batch: on the CPU a generator per row; on a device the batched
    draw (`draw`), keyed by each request's (seed, output index).
    """
    logits = sanitize(logits.float())
    vocab = logits.shape[-1]
    constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
    unsuppressed = logits[constrained].clone() if constrained else None
    for i, seq in enumerate(seqs):
        if suppressed := [t for t in seq.suppressed_token_ids if 0 <= t < vocab]:
            logits[i, suppressed] = float("-inf")
    reported = logits
    if constrained or any(s.params.penalized or s.params.logit_bias for s in seqs):
        logits = logits.clone()
        _penalize(logits, seqs)
        _bias(logits, seqs)
    if constrained:
        _mask(logits, [seqs[i] for i in constrained], constrained, unsuppressed)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        rows = [seqs[i] for i in sampled]
        probs = _filtered_probs(logits[sampled], rows)
        # A row with nothing left to draw from (every logit -inf or NaN) keeps its argmax.
        usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
        if probs.device.type == "cpu":
            for row, i in enumerate(sampled):
                if usable[row]:
                    tokens[i] = torch.multinomial(probs[row], 1, generator=seqs[i].generator)[0]
        else:
            index = to_device(sampled, logits.device, torch.int64)
            drawn = draw(probs, [s.sampling_key for s in rows])
            tokens[index] = torch.where(usable, drawn, tokens[index])
    token_list = tokens.tolist()  # the step's one host synchronisation
    return token_list, _logprobs(reported, token_list, seqs)


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A step's parameters as a tensor where the logits are: built on the host, copied once, and on a
    GPU from pinned memory without waiting (the copy is queued on the stream like the kernels)."""
    return _moved(torch.tensor(values, dtype=dtype), device)


def _moved(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def draw(probs: torch.Tensor, keys: list[tuple[int, int]]) -> torch.Tensor:
    """One token per row of `probs` (R, V), drawn where the tensor lives, as a pure function of the
    row's key: the exponential race (Gumbel-max), argmax of p / E with E = -log U, where U for (key,
    token) comes from a counter-based hash. No generator state and no host round trip, so a batch of
    rows is one chain of tensor operations on a GPU, and a seeded request draws the same token on any
    worker. The uniforms have 24 bits: a token less likely than about 1e-7 cannot win a draw."""
    lanes = to_device(keys, probs.device, torch.int64)  # (R, 2), each < 2**32
    token = torch.arange(probs.shape[-1], dtype=torch.int64, device=probs.device)[None, :]
    bits = _hash32(_hash32(token ^ lanes[:, :1]) ^ lanes[:, 1:])
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return (probs / -torch.log(uniform)).argmax(dim=-1)


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of int64 tensors holding values < 2**32, computed without
    ever exceeding 63 bits (so without relying on how a device wraps signed overflow)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, in 16-bit halves: each partial product stays below 2**48."""
    low, high = x & 0xFFFF, x >> 16
    return (low * c + (((high * c) & 0xFFFF) << 16)) & _MASK32


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """NaN → -inf (never chosen), +inf → the largest finite float (chosen, without poisoning softmax)."""
    return torch.nan_to_num(
        logits, nan=float("-inf"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf")
    )


def _penalize(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Repetition penalty over prompt and output (a positive logit divided by it, a negative one
    multiplied), then frequency and presence over the output, as OpenAI defines them.

    Only the logits of tokens a row has seen change, so the work follows the tokens seen, not the
    vocabulary: each kind of penalty finds its (row, token) pairs with one `unique` over keys
    row * vocab + token, gathers those logits, changes them and puts them back, the index built on the
    host and copied once. (Counting over the whole vocabulary per step cost 105-139 ms at 32 rows and
    Qwen's 151,936 tokens on one core.) The arithmetic is the dense form's, term for term, so the
    result is the same to the bit."""
    rows = [i for i, s in enumerate(seqs) if s.params.penalized]
    if not rows:
        return
    vocab, device = logits.shape[-1], logits.device
    params = [seqs[i].params for i in rows]
    at_row = torch.tensor(rows, dtype=torch.long)  # a penalized row's place in the batch
    rep = torch.tensor([p.repetition_penalty for p in params])
    frequency = torch.tensor([p.frequency_penalty for p in params])
    presence = torch.tensor([p.presence_penalty for p in params])
    outputs = [seqs[i].output_token_ids for i in rows]
    tokens = torch.tensor([t for output in outputs for t in output], dtype=torch.long)
    owner = torch.arange(len(rows)).repeat_interleave(torch.tensor([len(o) for o in outputs]))
    kept = tokens < vocab
    output_keys = owner[kept] * vocab + tokens[kept]  # row * vocab + token, one per output token

    repeating = rep != 1
    if repeating.any():
        prompts = [k * vocab + _prompt_tokens(seqs[i], vocab) for k, i in enumerate(rows) if repeating[k]]
        seen = torch.unique(torch.cat([*prompts, output_keys[repeating[output_keys // vocab]]]))
        local = seen // vocab
        at = _moved(torch.stack([at_row[local], seen % vocab]), device)
        penalty = _moved(rep[local], device)
        values = logits[at[0], at[1]]
        logits[at[0], at[1]] = torch.where(values > 0, values / penalty, values * penalty)

    keys = output_keys[((frequency != 0) | (presence != 0))[output_keys // vocab]]
    if keys.numel():
        distinct, counts = torch.unique(keys, return_counts=True)
        local = distinct // vocab
        at = _moved(torch.stack([at_row[local], distinct % vocab]), device)
        per_entry = _moved(torch.stack([frequency[local], presence[local], counts.float()]), device)
        values = logits[at[0], at[1]]
        logits[at[0], at[1]] = values - per_entry[0] * per_entry[2] - per_entry[1]


def _prompt_tokens(seq: Sequence, vocab: int) -> torch.Tensor:
    """The prompt's distinct tokens below `vocab`, made on the sequence's first penalized step."""
    if seq.penalty_prompt is None:
        prompt = torch.unique(torch.tensor(seq.prompt_token_ids, dtype=torch.long))
        seq.penalty_prompt = prompt[prompt < vocab]
    return seq.penalty_prompt


def _bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    vocab = logits.shape[-1]
    entries = [(i, t, b) for i, s in enumerate(seqs) for t, b in s.params.logit_bias if t < vocab]
    if not entries:
        return
    rows, cols, values = zip(*entries, strict=True)
    index = to_device([rows, cols], logits.device, torch.int64)
    logits.index_put_((index[0], index[1]), to_device(values, logits.device, logits.dtype), accumulate=True)


def _mask(
    logits: torch.Tensor, seqs: list[Sequence], rows: list[int], unsuppressed: torch.Tensor | None
) -> None:
    """Tokens the grammar does not allow next become -inf. A row that min_tokens left with nothing
    the grammar allows (the grammar can only end) takes the grammar's choice: it wins."""
    allowed = _moved(structured.allowed_mask([s.matcher for s in seqs], logits.shape[-1]), logits.device)
    masked = logits[rows].masked_fill(~allowed, float("-inf"))
    if unsuppressed is not None:
        empty = ~torch.isfinite(masked).any(dim=-1, keepdim=True)
        masked = torch.where(empty, unsuppressed.masked_fill(~allowed, float("-inf")), masked)
    logits[rows] = masked


def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    vocab = logits.shape[-1]
    # Greedy temperatures never reach here (SamplingParams normalises them); the floor keeps a
    # hand-built one from dividing by zero.
    on = dict(dtype=logits.dtype, device=logits.device)  # the sampling parameters, where the logits are
    temps = to_device([max(s.params.temperature, 1e-5) for s in seqs], **on)[:, None]
    # Shift by the row maximum first: every finite entry becomes <= 0, so dividing by a small temperature
    # can only go towards -inf (probability 0), never to +inf or NaN. Rows that are all -inf stay so.
    row_max = logits.max(dim=-1, keepdim=True).values
    shifted = torch.where(torch.isfinite(row_max), logits - row_max, logits)
    logits = torch.nan_to_num(shifted / temps, nan=float("-inf"))
    if any(s.params.min_p > 0 for s in seqs):
        min_p = to_device([s.params.min_p for s in seqs], **on)[:, None]
        # After the temperature: a token stays when its probability is at least min_p times the top one's.
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    ranked, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    top_k = to_device([min(s.params.top_k, vocab) or vocab for s in seqs], logits.device, torch.int64)[
        :, None
    ]
    ranked = ranked.masked_fill(rank >= top_k, float("-inf"))
    probs = ranked.softmax(dim=-1)
    top_p = to_device([s.params.top_p for s in seqs], **on)[:, None]
    # Drop a token once the tokens ranked above it already cover top_p (the best one always stays).
    beyond = (probs.cumsum(dim=-1) - probs) >= top_p
    beyond[:, 0] = False
    ranked = ranked.masked_fill(beyond, float("-inf"))
    return torch.zeros_like(logits).scatter_(-1, order, ranked.softmax(dim=-1))


def _logprobs(logits: torch.Tensor, tokens: list[int], seqs: list[Sequence]) -> list[dict[int, float] | None]:
    wanted = [s.params.logprobs for s in seqs]
    rows = [i for i, n in enumerate(wanted) if n is not None]
    if not rows:
        return [None] * len(seqs)
    logp = torch.nan_to_num(logits.log_softmax(dim=-1), nan=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR)
    # Every row that asks, at once: on a GPU, per-row reads would each wait for the device.
    at = torch.tensor(rows, device=logp.device)
    chosen = logp[at, torch.tensor([tokens[i] for i in rows], device=logp.device)]
    top = min(max(wanted[i] or 0 for i in rows), logp.shape[-1])
    values, ids = (
        logp[at].topk(top) if top else (logp.new_zeros((len(rows), 0)), at.new_zeros((len(rows), 0)))
    )
    chosen_l, values_l, ids_l = chosen.tolist(), values.tolist(), ids.tolist()  # the first waits, once
    out: list[dict[int, float] | None] = [None] * len(seqs)
    for j, i in enumerate(rows):
        entry = {tokens[i]: chosen_l[j]}
        n = min(wanted[i] or 0, top)
        entry.update(zip(ids_l[j][:n], values_l[j][:n], strict=True))
        out[i] = entry
    return out
