"""The first leg of vLLM's disaggregated arms in the peer benchmark: one output token, not streamed,
nothing that would make it a 400; for P/D, the handle that asks the prefill instance to keep the KV."""

from loadgen.peer_proxy import first_leg

BODY = {
    "model": "epd-small",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 32,
    "min_tokens": 32,
    "ignore_eos": True,
}


def test_the_encoder_leg_asks_for_one_token_and_no_minimum():
    leg = first_leg(BODY, "ec")
    assert leg["max_tokens"] == 1 and leg["stream"] is False
    assert "min_tokens" not in leg and "stream_options" not in leg
    assert "kv_transfer_params" not in leg
    assert BODY["max_tokens"] == 32 and BODY["min_tokens"] == 32, "the client's request is not changed"


def test_the_prefill_leg_asks_to_keep_the_kv_for_a_remote_decode():
    leg = first_leg(BODY, "kv")
    assert leg["kv_transfer_params"]["do_remote_decode"] is True
    assert leg["kv_transfer_params"]["do_remote_prefill"] is False
    assert leg["max_tokens"] == 1
