from __future__ import annotations

import filecmp

from serving.engine.models.builder import build_model
from serving.engine.models.config import load_model_config
from serving.engine.tokenizer import Tokenizer


def test_same_preset_gives_byte_identical_files(tmp_path, tiny_model):
    again = build_model(tmp_path / "epd-tiny", "tiny")
    names = sorted(p.name for p in tiny_model.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    match, mismatch, errors = filecmp.cmpfiles(tiny_model, again, names, shallow=False)
    assert mismatch == [] and errors == [] and match == names


def test_other_seed_gives_other_weights(tmp_path, tiny_model):
    other = build_model(tmp_path / "other", "tiny", seed=1)
    assert not filecmp.cmp(tiny_model / "model.safetensors", other / "model.safetensors", shallow=False)


def test_tokenizer_has_qwen_special_tokens_and_chat_template(tiny_model):
    tok = Tokenizer(tiny_model)
    cfg = load_model_config(tiny_model)
    assert tok.token_id("<|image_pad|>") == cfg.image_token_id
    assert tok.token_id("<|im_end|>") in cfg.eos_token_ids
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    )
    assert text.endswith("<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok.encode("a red house")) == "a red house"
    assert cfg.text.vocab_size >= tok.vocab_size
