"""The OpenAI logprobs rendering from the sampler's real entries: the top list holds the `top` most
likely tokens, the chosen one included when it is among them."""

from __future__ import annotations

import torch

from serving.engine.sampler import _logprobs
from serving.gateway.render import logprobs_body
from serving.types import SamplingParams


class _Seq:
    def __init__(self, n: int) -> None:
        self.params = SamplingParams(logprobs=n)


def decode(ids: list[int], skip_special_tokens: bool = False) -> str:
    return f"<{ids[0]}>"


def entries(logits: list[float], chosen: int, top: int) -> list[dict[int, float]]:
    (entry,) = _logprobs(torch.tensor([logits]), [chosen], [_Seq(top)])
    assert entry is not None
    return [entry]


def test_the_chosen_token_among_the_best_stays_in_the_top_list() -> None:
    # Greedy: the chosen token is the most likely one.
    body = logprobs_body("chat", entries([3.0, 1.0, 2.0, 0.0], chosen=0, top=1), decode, top=1)
    (content,) = body["content"]
    assert content["token"] == "<0>"
    assert [t["token"] for t in content["top_logprobs"]] == ["<0>"]
    body = logprobs_body("chat", entries([3.0, 1.0, 2.0, 0.0], chosen=0, top=3), decode, top=3)
    assert [t["token"] for t in body["content"][0]["top_logprobs"]] == ["<0>", "<2>", "<1>"]


def test_a_sampled_token_outside_the_best_is_not_in_the_top_list() -> None:
    body = logprobs_body("chat", entries([3.0, 1.0, 2.0, 0.0], chosen=3, top=2), decode, top=2)
    (content,) = body["content"]
    assert content["token"] == "<3>"
    tops = content["top_logprobs"]
    assert [t["token"] for t in tops] == ["<0>", "<2>"]
    assert tops[0]["logprob"] > tops[1]["logprob"] > content["logprob"]


def test_text_completions_get_the_same_top_lists() -> None:
    body = logprobs_body("text", entries([3.0, 1.0, 2.0, 0.0], chosen=0, top=2), decode, top=2)
    assert body["tokens"] == ["<0>"]
    assert list(body["top_logprobs"][0]) == ["<0>", "<2>"]
    assert (
        logprobs_body("chat", entries([1.0, 0.0], chosen=1, top=0), decode)["content"][0]["top_logprobs"]
        == []
    )


def test_bytes_are_the_tokens_own_even_for_part_of_a_character(tiny_model) -> None:
    from serving.engine.tokenizer import Tokenizer

    tok = Tokenizer(tiny_model)
    ids = tok.encode_text("héllo 世界")
    # Byte-level BPE splits these characters: some tokens decode to U+FFFD on their own ...
    assert any(tok.decode([i], skip_special_tokens=False) == "\ufffd" for i in ids)
    # ... but their bytes, joined, are the text's UTF-8 bytes.
    assert b"".join(tok.token_bytes(i) for i in ids) == "héllo 世界".encode()
    assert tok.token_bytes(tok.token_id("<|im_start|>")) == b"<|im_start|>"
    partial = next(i for i in ids if tok.decode([i], skip_special_tokens=False) == "\ufffd")
    body = logprobs_body("chat", [{partial: -0.5}], tok.decode, 0, tok.token_bytes)
    assert body["content"][0]["bytes"] == list(tok.token_bytes(partial)) != list("\ufffd".encode())
