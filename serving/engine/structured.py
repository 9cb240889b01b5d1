"""Constrained decoding: a request's grammar (llguidance) as a matcher that follows its sequence, and
the token mask it puts on each step's logits.

The gateway turns `response_format`, `structured_outputs` and forced tool calls into one llguidance
grammar string and checks that it compiles; the string travels in `SamplingParams`, so every worker a
request reaches (prefill for the first token, decode for the rest, a new decode worker after a
migration) builds its own matcher from it. llguidance's default parser limits bound the work of one
step (a few milliseconds at most), so no grammar a client sends can stall a worker: a step past them
puts the matcher in an error state and the request fails alone, with a 400 (`grammar_too_complex`):
its grammar, not the worker, is at fault (any other refusal is the engine's). A matcher's state is
a function of the tokens it consumed: `Sequence.restore` replays the streamed outputs through it,
which is how it survives a migration or a role switch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from serving.types import Rejected, Rejection

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer

log = logging.getLogger(__name__)


def load_tokenizer(model_dir: str | Path, vocab_size: int, eos_token_ids: tuple[int, ...]) -> LLTokenizer:
    """llguidance's view of the model's tokenizer: `vocab_size` is the logits' width (it may exceed the
    tokenizer's), and a grammar's end is any of the model's end-of-sequence tokens."""
    from llguidance import LLTokenizer

    text = (Path(model_dir) / "tokenizer.json").read_text()
    return LLTokenizer(text, n_vocab=vocab_size, eos_token=list(eos_token_ids))


def grammar_error(tokenizer: LLTokenizer, grammar: str) -> str | None:
    """Why `grammar` cannot be used with this tokenizer, or None when it can. A grammar that compiles
    but matches nothing (a regex's empty class) shows it at its first mask: refused too."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        return messages[0]
    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    if not matcher.is_error():
        allowed_mask([matcher], tokenizer.vocab_size)
    return matcher.get_error() or "it matches no text" if matcher.is_error() else None


def new_matcher(tokenizer: LLTokenizer, grammar: str) -> LLMatcher:
    from llguidance import LLMatcher

    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ValueError(f"the grammar does not compile: {matcher.get_error()}")
    return matcher


TOO_COMPLEX = Rejection(
    400,
    "grammar_too_complex",
    None,
    "The request's output constraint (response_format, structured_outputs or a forced tool call) went "
    "past the server's parser limits while generating; simplify it (fewer repetitions, shallower "
    "recursion).",
)


def consume(matcher: LLMatcher, token_id: int) -> None:
    """Advance the matcher by a sampled (or replayed) token. Once the grammar is complete it allows
    only the end of the sequence, and a request that ignores EOS goes on emitting it: nothing is left
    to check.

    A grammar can compile and give a first mask and only later run into llguidance's lexer or parser
    limits (`a{1000000}` on its first token, whether while a mask is computed or a token consumed): the
    client's grammar, a 400 (`Rejected`), not a stage's failure. Any other refusal (a token the mask
    did not allow: logits with nothing usable left) is the engine's, a `ValueError`. llguidance gives
    no typed reason (`stop_reason()` says `InternalError` for both), so its message tells them apart."""
    if not matcher.is_error() and matcher.is_stopped():
        return  # an errored matcher is stopped too: it must not pass for a finished one
    if matcher.is_error() or not matcher.consume_token(token_id) or matcher.is_error():
        error = matcher.get_error() or ""
        if _past_limits(error):
            log.info("a request's grammar met the parser's limits: %s", error.split("\n")[0])
            raise Rejected(TOO_COMPLEX)
        raise ValueError(
            f"token {token_id} breaks the request's grammar: {error.splitlines()[0] if error else ''}"
        )


def _past_limits(error: str) -> bool:
    """Whether llguidance stopped on its own limits (lexer expressions, parser items): its message's
    first line says so; the state dump after it names limits whatever the cause."""
    first = error.split("\n", 1)[0].lower()
    return "too many" in first or "too complex" in first


def allowed_mask(matchers: list[LLMatcher], vocab_size: int) -> torch.Tensor:
    """(len(matchers), vocab_size) bool on the CPU: the tokens each matcher allows next. One call per
    step for the whole batch; the caller moves it to the logits' device in one copy."""
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    bitmask = allocate_token_bitmask(len(matchers), vocab_size)
    for i, matcher in enumerate(matchers):
        fill_next_token_bitmask(matcher, bitmask, i)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits.astype(bool))
